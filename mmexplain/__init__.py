"""mmexplain: Grad-CAM and Grad-CAM++ for vision-language and video models.

    import mmexplain as mx
    cam = mx.GradCAM(model, layer="layer4")
    expl = cam(x, target=[281, 243])      # maps (B, 2, h, w) from one backward

Submodules stay importable as modules (``import mmexplain.guided``): the
functions once exported under their names are ``guided_gradcam`` and
``occlusion_sensitivity``; calling the modules still calls them (deprecated).
"""

import sys
import types
import warnings
from typing import Any

from mmexplain.engine import CAM, Explanation, GradCAM, GradCAMPlusPlus, normalize_maps
from mmexplain.errors import InputError, InputTypeError, MMExplainError
from mmexplain.guided import GuidedBackprop, guided_gradcam, to_image
from mmexplain.methods import gradcam_pp_alpha, gradcam_pp_weights, gradcam_weights
from mmexplain.occlusion import Occlusion, occlusion_sensitivity
from mmexplain.targets import IndexTarget, TopPrediction, logits_of
from mmexplain.textual import NeuronNames, TextualExplanation, neuron_names, top_neurons
from mmexplain.vocab import Vocabulary

__version__ = "0.1.0"

__all__ = [
    "CAM",
    "Explanation",
    "GradCAM",
    "GradCAMPlusPlus",
    "GuidedBackprop",
    "NeuronNames",
    "Occlusion",
    "TextualExplanation",
    "Vocabulary",
    "guided_gradcam",
    "neuron_names",
    "occlusion_sensitivity",
    "to_image",
    "top_neurons",
    "IndexTarget",
    "InputError",
    "InputTypeError",
    "MMExplainError",
    "TopPrediction",
    "__version__",
    "gradcam_pp_alpha",
    "gradcam_pp_weights",
    "gradcam_weights",
    "logits_of",
    "normalize_maps",
]


class _CallableModule(types.ModuleType):
    """A submodule that a function of the package used to shadow (``mx.guided(...)``,
    ``mx.occlusion(...)``): it is the module now, and calling it calls the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        old, new = self.__name__.rsplit(".", 1)[1], self.__dict__["_called_as"]
        warnings.warn(f"mmexplain.{old}(...) is deprecated: call mmexplain.{new}(...) "
                      f"(mmexplain.{old} is the module)", DeprecationWarning, stacklevel=2)
        return getattr(self, new)(*args, **kwargs)


for _module, _function in (("guided", "guided_gradcam"), ("occlusion", "occlusion_sensitivity")):
    sys.modules[f"{__name__}.{_module}"].__class__ = _CallableModule
    sys.modules[f"{__name__}.{_module}"]._called_as = _function
del _module, _function
