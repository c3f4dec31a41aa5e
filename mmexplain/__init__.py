"""mmexplain: Grad-CAM and Grad-CAM++ for vision-language and video models.

    import mmexplain as mx
    cam = mx.GradCAM(model, layer="layer4")
    expl = cam(x, target=[281, 243])      # maps (B, 2, h, w) from one backward
"""

from mmexplain.engine import CAM, Explanation, GradCAM, GradCAMPlusPlus, normalize_maps
from mmexplain.errors import InputError, InputTypeError, MMExplainError
from mmexplain.guided import GuidedBackprop, guided, to_image
from mmexplain.methods import gradcam_pp_alpha, gradcam_pp_weights, gradcam_weights
from mmexplain.occlusion import Occlusion, occlusion
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
    "guided",
    "neuron_names",
    "occlusion",
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
