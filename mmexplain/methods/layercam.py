"""LayerCAM (Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for
Localization", IEEE TIP 2021): every position weighted by its own positive gradient.

    w^k_ij = ReLU(dS/dA^k_ij)                          (LayerCAM eq. 5)
    L      = ReLU(sum_k w^k_ij A^k_ij)                 (LayerCAM eq. 6)

Position-wise weights; the channel weights reported are their mean over the grid.
"""

from __future__ import annotations

import torch

from mmexplain.methods import Method, Options


class LayerCAM(Method, register=True, name="layercam", label="LayerCAM", short="LC", order=10,
               paper="Jiang et al., LayerCAM, IEEE TIP 2021", equation="eq. 5-6"):
    """LayerCAM eq. 5-6: position-wise positive gradients."""

    def weights(self, acts: torch.Tensor, grads: torch.Tensor | None, options: Options,
                moments: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        return torch.relu(grads)  # eq. 5, (N, C, *grid)
