"""Grad-CAM (Selvaraju et al.): global-average-pooled gradients as channel weights.

    alpha_k = 1/Z sum_ij dS/dA^k_ij                     (Grad-CAM eq. 1)
    L       = ReLU(sum_k alpha_k A^k)                    (Grad-CAM eq. 2)

``pooling="max"`` is the global-max-pooling ablation of appendix B.2.2.
"""

from __future__ import annotations

import torch

from mmexplain.methods import Method, Options


def gradcam_weights(grads: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Grad-CAM eq. 1: grads (N, C, *grid) -> (N, C) (``pooling="max"``: appendix B.2.2)."""
    flat = grads.flatten(2)  # (N, C, Z)
    if pooling == "max":
        return flat.amax(dim=2)
    return flat.mean(dim=2)


class GradCAM(Method, register=True, name="gradcam", label="Grad-CAM", short="GC", order=0,
              paper="Selvaraju et al., Grad-CAM, ICCV 2017 / IJCV 2019", equation="eq. 1-2",
              accepts={"counterfactual", "gradients", "relu", "pooling"}):
    """Grad-CAM eq. 1-2 (pooling: appendix B.2.2)."""

    def weights(self, acts: torch.Tensor, grads: torch.Tensor | None, options: Options,
                moments: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        return gradcam_weights(grads, options.pooling)
