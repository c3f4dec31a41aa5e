"""Grad-CAM++ (Chattopadhyay et al.): pixel-wise weighted positive gradients.

    alpha_ij = g_ij^2 / (2 g_ij^2 + sum_ab A_ab g_ij^3)       (Grad-CAM++ eq. 19)
    w_k      = sum_ij alpha^k_ij relu(dS/dA^k_ij)             (eq. 20)
    L        = ReLU(sum_k w_k A^k)

``form="softmax"`` explains Y^c = softmax(S)^c with the closed forms of eq. 22-24,
for which the engine passes the gradient moments over all classes.
"""

from __future__ import annotations

import torch

from mmexplain.methods import Method, Options, _grid_dims


def gradcam_pp_alpha(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ eq. 19 (exponential closed form), zero where undefined.

        alpha_ij = g_ij^2 / (2 g_ij^2 + sum_ab A_ab * g_ij^3)

    computed as 1 / (2 + s * g_ij) with s = sum_ab A_ab (divide through by
    g_ij^2), which is the same number wherever g_ij != 0 and never forms the
    overflowing powers g^2, g^3 that make other implementations return inf/NaN
    for large gradients. alpha = 0 where g_ij = 0 or the denominator is 0.
    acts, grads (N, C, *grid) -> alpha (N, C, *grid)
    """
    s = acts.sum(dim=_grid_dims(acts), keepdim=True)  # (N, C, 1...) sum over all positions
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


class GradCAMPlusPlus(Method, register=True, name="gradcam++", label="Grad-CAM++", short="GC++",
                      order=1, paper="Chattopadhyay et al., Grad-CAM++, WACV 2018",
                      equation="eq. 19-20 (softmax form eq. 22-24)",
                      accepts={"counterfactual", "gradients", "relu", "form"}):
    """Grad-CAM++ eq. 19-20, its softmax form eq. 22-24."""

    def wants_moments(self, options: Options) -> bool:
        return options.form == "softmax"

    def weights(self, acts: torch.Tensor, grads: torch.Tensor | None, options: Options,
                moments: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        if moments is not None:
            return gradcam_pp_softmax_weights(acts, grads, *moments)
        return gradcam_pp_weights(acts, grads)
