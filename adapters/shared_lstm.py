"""The captioner's fast path for the engine's expanded rows: a one-layer LSTM run once per
input for K equal rows, with a hand-written backward through time of each row's own output
gradient to the image input only (tests/test_captioner.py checks it against ``nn.LSTM``)."""

from __future__ import annotations

from typing import Any

import torch

from mmexplain import kernels


def _equal_in_groups(k: int, *tensors: torch.Tensor) -> bool:
    """Whether each tensor's rows come in groups of ``k`` equal ones."""
    for t in tensors:
        if t.shape[0] % k:
            return False
        groups = t.detach().reshape(t.shape[0] // k, k, -1)
        if not bool((groups == groups[:, :1]).all()):
            return False
    return True


class _SharedRowsLSTM(torch.autograd.Function):
    """A one-layer ``nn.LSTM`` (batch first, zero initial state) on N = U*K rows whose
    groups of K consecutive rows are equal in the forward (the engine's expanded rows: row
    u*K+j is input u, read on target j) and differ only in their output gradients.

    The forward runs once per group, on U rows; the backward takes the N rows' own output
    gradients back through time by hand, for the image input x_{-1} (step 0) only: the
    words' embeddings come in detached (the engine explains the image), and no weight
    gets a gradient (the engine asks for none; oneDNN's fused backward computes them
    anyway). Gates as ``nn.LSTM``: i, f, g, o = chunks of x W_ih^T + b_ih + h W_hh^T +
    b_hh; c' = f c + i g, h' = o tanh(c')."""

    @staticmethod
    def forward(ctx: Any, x_img: torch.Tensor, words: torch.Tensor, k: int,
                w_ih: torch.Tensor, w_hh: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        u = torch.cat([x_img[::k, None], words[::k]], dim=1)  # (U, T, E): a row per group
        groups, steps, _ = u.shape
        hid = w_hh.shape[1]
        # the products by W_ih and W_hh go through oneDNN's packed weights on CPU (kernels)
        pre = kernels.linear(u.reshape(groups * steps, -1), w_ih, bias).view(groups, steps, -1)
        gates = torch.empty_like(pre)  # (U, T, 4H): i, f, g, o after their nonlinearities
        cells = u.new_zeros(groups, steps + 1, hid)  # c_{t-1} at t: cells[:, 0] = 0
        hs = u.new_empty(groups, steps, hid)
        h = u.new_zeros(groups, hid)
        for t in range(steps):
            z = kernels.linear(h, w_hh).add_(pre[:, t])
            act = gates[:, t]
            torch.sigmoid(z, out=act)  # i, f, o (g's slot overwritten next)
            torch.tanh(z[:, 2 * hid:3 * hid], out=act[:, 2 * hid:3 * hid])
            i, f, g, o = act.chunk(4, dim=1)
            c = torch.addcmul(f * cells[:, t], i, g, out=cells[:, t + 1])
            h = torch.mul(o, c.tanh(), out=hs[:, t])
        ctx.k, ctx.weights = k, (w_ih, w_hh)
        ctx.save_for_backward(gates, cells)
        return hs.repeat_interleave(k, dim=0)  # (N, T, H)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Any, ...]:
        k, (w_ih, w_hh) = ctx.k, ctx.weights
        gates, cells = ctx.saved_tensors
        n, steps, hid = dout.shape
        dout = dout.reshape(n // k, k, steps, hid)
        # a row read on step p has no gradient after p: order the K rows by their last step
        # with a gradient (over all groups), so that the rows still carrying one at step t
        # are a prefix -- the backward does about half the work of K full rows
        steps_with = (dout != 0).any(dim=3).any(dim=0)  # (K, T)
        t_idx = torch.arange(steps, device=dout.device)
        last = torch.where(steps_with, t_idx, -1).amax(dim=1)  # (K,)
        last, order = last.sort(descending=True)
        dout = dout[:, order]
        lasts = last.tolist()
        active = [sum(p >= t for p in lasts) for t in range(steps)]
        # every step's local derivatives at once, (U, T, ...): with tc = tanh(c_t),
        # dc_t = dc_{t+1} f_{t+1} + dh_t o (1 - tc^2), and the pre-activation gradients
        # (i, f, g, o) = dc_t (g i (1-i), c_{t-1} f (1-f), i (1-g^2)), dh_t tc o (1-o)
        i, f, g, o = gates.unsqueeze(2).chunk(4, dim=3)  # each (U, T, 1, H)
        tc = cells[:, 1:].unsqueeze(2).tanh()
        via_h = o * (1 - tc * tc)
        local = torch.cat([g * i * (1 - i), cells[:, :-1].unsqueeze(2) * f * (1 - f),
                           i * (1 - g * g), tc * o * (1 - o)], dim=2)  # (U, T, 4, H)
        dh = torch.zeros_like(dout[:, :, 0])  # (U, K, H), from step t+1
        dc = torch.zeros_like(dh)
        dx = dout.new_zeros(n // k, k, w_ih.shape[1])
        for t in range(steps - 1, -1, -1):
            m = active[t]
            if m == 0:
                continue
            dh_t = dh[:, :m] + dout[:, :m, t]
            dc_t = torch.addcmul(dc[:, :m], dh_t, via_h[:, t])
            both = torch.cat([dc_t.unsqueeze(2).expand(-1, -1, 3, -1), dh_t.unsqueeze(2)],
                             dim=2)  # (U, m, 4, H): dc_t for i, f, g; dh_t for o
            dgate = both.mul_(local[:, t, None]).view(-1, 4 * hid)
            if t:
                dh[:, :m] = kernels.linear(dgate, w_hh, transpose=True).view_as(dh_t)
                torch.mul(dc_t, f[:, t], out=dc[:, :m])
            else:
                dx[:, :m] = kernels.linear(dgate, w_ih, transpose=True).view(dh_t.shape[0], m,
                                                                             -1)
        out = torch.empty_like(dx)
        out[:, order] = dx
        return out.view(n, -1), None, None, None, None, None

