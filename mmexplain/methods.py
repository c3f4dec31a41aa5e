"""Weight rules: how a method turns activations and gradients into channel weights.

Every rule sees the same shapes and reduces over every axis after the channel
axis, so 2-D (H, W) and 3-D (T, H, W) grids are one code path:

    A: (N, C, *grid)  activations at the target layer
    G: (N, C, *grid)  dS/dA for the N = B*K (input, target) pairs
    -> weights (N, C)

References: Grad-CAM paper (``shared/papers/gradcam.md``) eq. 1, 2, 12 and the
ablations of appendix B; Grad-CAM++ paper (``gradcam_plusplus.md``) eq. 19, 20.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmexplain.errors import bad_value


def _grid_dims(t: torch.Tensor) -> tuple[int, ...]:
    """Every axis after (N, C): (2, 3) for images, (2, 3, 4) for clips."""
    return tuple(range(2, t.dim()))


@dataclass(frozen=True)
class WeightRule:
    """A method's weight rule plus the options it shares with the others.

    ``counterfactual`` negates the gradients (Grad-CAM eq. 12); ``gradients``
    = "abs" uses |dS/dA| (appendix B.2 ablation); ``relu`` applies the ReLU of
    eq. 2 / eq. 20 to the combined map (``False`` is the appendix B.2.1 ablation).
    """

    name: str = "gradcam"
    pooling: str = "mean"
    gradients: str = "raw"
    counterfactual: bool = False
    relu: bool = True

    def __post_init__(self) -> None:
        if self.name not in ("gradcam", "gradcam++"):
            raise bad_value("method", "'gradcam' or 'gradcam++'", self.name)
        if self.pooling not in ("mean", "max"):
            raise bad_value("pooling", "'mean' or 'max'", self.pooling)
        if self.gradients not in ("raw", "abs"):
            raise bad_value("gradients", "'raw' or 'abs'", self.gradients)

    def prepare(self, grads: torch.Tensor) -> torch.Tensor:
        """Apply the gradient options (counterfactual sign, absolute value)."""
        if self.counterfactual:
            grads = -grads  # Grad-CAM eq. 12: negative gradients
        if self.gradients == "abs":
            grads = grads.abs()  # appendix B.2: absolute gradients
        return grads

    def weights(self, acts: torch.Tensor, grads: torch.Tensor,
                moments: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """Channel weights (N, C) from activations and gradients (N, C, *grid).

        ``moments`` (the softmax form of Grad-CAM++ only): sum_k Y^k g_k^p for
        p = 1, 2, 3 over all classes k, each (N, C, *grid).
        """
        grads = self.prepare(grads)
        if self.name == "gradcam++":
            if moments is not None:
                return gradcam_pp_softmax_weights(acts, grads, *moments)
            return gradcam_pp_weights(acts, grads)
        return gradcam_weights(grads, self.pooling)

    def combine(self, acts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Map (N, *grid) = [ReLU] sum_k w_k A^k (Grad-CAM eq. 2, Grad-CAM++ eq. 20)."""
        shape = weights.shape + (1,) * (acts.dim() - 2)
        cam = (weights.view(shape) * acts).sum(dim=1)
        return torch.relu(cam) if self.relu else cam


def gradcam_weights(grads: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Grad-CAM eq. 1: alpha_k = 1/Z sum_ij dS/dA^k_ij (global average pooling).

    ``pooling="max"`` is the global-max-pooling ablation of appendix B.2.2.
    grads (N, C, *grid) -> (N, C)
    """
    flat = grads.flatten(2)  # (N, C, Z)
    if pooling == "max":
        return flat.amax(dim=2)
    return flat.mean(dim=2)


def gradcam_pp_alpha(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ eq. 19 (exponential closed form), zero where undefined.

        alpha_ij = g_ij^2 / (2 g_ij^2 + sum_ab A_ab * g_ij^3)

    computed as 1 / (2 + s * g_ij) with s = sum_ab A_ab (divide through by
    g_ij^2), which is the same number wherever g_ij != 0 and never forms the
    overflowing powers g^2, g^3 that make other implementations return inf/NaN
    for large gradients. alpha = 0 where g_ij = 0 or the denominator is 0.
    acts, grads (N, C, *grid) -> alpha (N, C, *grid)
    """
    dims = _grid_dims(acts)
    s = acts.sum(dim=dims, keepdim=True)  # (N, C, 1...) sum over all positions
    denom = 2.0 + s * grads
    valid = (grads != 0) & (denom != 0)
    safe = torch.where(valid, denom, torch.ones_like(denom))
    return torch.where(valid, 1.0 / safe, torch.zeros_like(denom))


def gradcam_pp_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ weights w_k = sum_ij alpha^k_ij relu(dS/dA^k_ij) (eq. 19-20).

    The exponential form Y = exp(S) scales every dY/dA by the same positive
    exp(S) (eq. 13), which only rescales the map; as in the issue's definition
    we use relu(dS/dA) so maps are comparable across targets.
    """
    alpha = gradcam_pp_alpha(acts, grads)
    return (alpha * torch.relu(grads)).flatten(2).sum(dim=2)


def gradcam_pp_softmax_weights(acts: torch.Tensor, grads: torch.Tensor, m1: torch.Tensor,
                               m2: torch.Tensor, m3: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ weights for Y^c = softmax(S)^c (section 3.4, eq. 21-24).

    With g_k = dS^k/dA_ij, second derivatives of S zero (eq. 16), and the
    moments m_p = sum_k Y^k g_k^p over all classes:

        d_c   = g_c - m1                       dY^c   = Y^c d_c                (eq. 22)
        q     = m2 - m1^2                      d2Y^c  = Y^c (d_c^2 - q)        (eq. 23)
        r     = m3 - 2 m1 m2 + m1^3            d3Y^c  = Y^c (d_c^3 - 3 q d_c - r + q m1)  (eq. 24)

    alpha = d2Y / (2 d2Y + sum_ab A_ab d3Y) (eq. 10 with eq. 23-24; Y^c cancels),
    zero where the denominator is zero, and w = sum_ij alpha relu(dY^c/dA) / Y^c
    (the positive factor Y^c only scales the map, as exp(S) in the exponential form).
    Computed in float64: the moments subtract nearly equal numbers.
    """
    dtype = grads.dtype
    a, g, m1, m2, m3 = (t.double() for t in (acts, grads, m1, m2, m3))
    d = g - m1
    q = m2 - m1 * m1
    r = m3 - 2 * m1 * m2 + m1**3
    second = d * d - q
    third = d**3 - 3 * q * d - r + q * m1
    s = a.sum(dim=_grid_dims(a), keepdim=True)
    denom = 2 * second + s * third
    valid = denom != 0
    alpha = torch.where(valid, second / torch.where(valid, denom, torch.ones_like(denom)),
                        torch.zeros_like(denom))
    return (alpha * torch.relu(d)).flatten(2).sum(dim=2).to(dtype)
