"""XGrad-CAM (Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization and
Explanation of CNNs", BMVC 2020): gradients averaged with the activations' own weights.

    w_k = sum_ij (A^k_ij / sum_ab A^k_ab) dS/dA^k_ij    (XGrad-CAM eq. 9)
    L   = ReLU(sum_k w_k A^k)

A channel whose activations sum to zero gets weight 0 (its term in L is 0 anyway
wherever it is all zero).
"""

from __future__ import annotations

import torch

from mmexplain.methods import Method, Options, _grid_dims


class XGradCAM(Method, register=True, name="xgradcam", label="XGrad-CAM", short="XGC", order=12,
               paper="Fu et al., Axiom-based Grad-CAM, BMVC 2020", equation="eq. 9"):
    """XGrad-CAM eq. 9: gradients weighted by the normalised activations."""

    def weights(self, acts: torch.Tensor, grads: torch.Tensor | None, options: Options,
                moments: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        dims = _grid_dims(acts)
        total = acts.sum(dim=dims)  # (N, C)
        num = (grads * acts).sum(dim=dims)
        nonzero = total != 0
        return torch.where(nonzero, num / torch.where(nonzero, total, torch.ones_like(total)),
                           torch.zeros_like(num))
