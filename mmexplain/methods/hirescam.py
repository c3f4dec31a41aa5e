"""HiResCAM (Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations
of convolutional neural networks", 2020): the gradient times the activation, summed over
channels, without Grad-CAM's averaging of the gradients over positions.

    L = sum_k dS/dA^k (.) A^k                          (HiResCAM, sec. 3.2)

No ReLU by default (the paper's map keeps its sign: for a model whose score is a
linear function of A it is exactly each position's contribution to the score);
``relu=True`` applies one, as pytorch-grad-cam always does.
"""

from __future__ import annotations

import torch

from mmexplain.methods import Method, Options


class HiResCAM(Method, register=True, name="hirescam", label="HiResCAM", short="HR", order=11,
               paper="Draelos & Carin, HiResCAM, arXiv:2011.08891, 2020", equation="sec. 3.2",
               relu=False):
    """HiResCAM: gradient times activation, position by position."""

    def weights(self, acts: torch.Tensor, grads: torch.Tensor | None, options: Options,
                moments: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        return grads  # position-wise: sum_k G^k (.) A^k
