"""Eigen-CAM (Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using Principal
Components", IJCNN 2020): the activations projected on their first principal component.

    O = A reshaped to (Z positions, C channels) = U S V^T        (Eigen-CAM eq. 4-5)
    L = O v_1                                                    (the projection on V_1)

Target-free: every target of an input gets the same map and the engine runs no
backward pass. As in the paper the activations are not centred before the
decomposition (pytorch-grad-cam subtracts the mean over positions first). The
sign of a singular vector is arbitrary; it is fixed so that the projection sums
to a non-negative number (with non-negative activations v_1 is then non-negative,
Perron-Frobenius). The channel weights reported are v_1.
"""

from __future__ import annotations

import torch

from mmexplain.methods import Method, Options


class EigenCAM(Method, register=True, name="eigencam", label="Eigen-CAM", short="EC", order=13,
               paper="Muhammad & Yeasin, Eigen-CAM, IJCNN 2020", equation="eq. 4-5",
               uses_gradients=False, accepts={"relu"}):
    """Eigen-CAM: the first principal component of the activations."""

    def weights(self, acts: torch.Tensor, grads: torch.Tensor | None, options: Options,
                moments: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        o = acts.flatten(2).transpose(1, 2).double()  # (N, Z, C)
        _, _, vh = torch.linalg.svd(o, full_matrices=False)
        v1 = vh[:, 0, :]  # (N, C) first right singular vector
        sign = torch.where((o @ v1.unsqueeze(2)).sum(dim=(1, 2)) < 0, -1.0, 1.0)
        return (v1 * sign.unsqueeze(1).to(v1.dtype)).to(acts.dtype)
