"""The shared-rows LSTM (adapters/shared_lstm.py) against nn.LSTM, row by row."""

from __future__ import annotations

import pytest
import torch

from mmexplain import kernels
from mmexplain.adapters import get_adapter
from mmexplain.vocab import Vocabulary

WORDS = "a an and red blue green circle square triangle left of".split()


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary.with_specials(WORDS)


def tiny_captioner(vocab: Vocabulary, seed: int = 0):
    torch.manual_seed(seed)
    return get_adapter("show-tell", vocab=vocab, trunk="tiny", trunk_channels=(4, 6, 8),
                       embed_size=6, hidden_size=7)


@pytest.mark.parametrize("packed", [False, True])
def test_shared_rows_lstm_equals_nn_lstm_and_gives_each_row_its_own_gradient(
        vocab: Vocabulary, packed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The expanded rows' LSTM (run once per group of K equal rows, back-propagated by hand
    to the image input) gives nn.LSTM's outputs and, for K different output gradients per
    group, nn.LSTM's gradients of x_{-1}, row by row. ``packed``: its products (and the
    vocabulary projection) through oneDNN's packed weights, as for large models."""
    if packed:
        if not kernels._ops_work():
            pytest.skip("this torch has no oneDNN packed linear")
        monkeypatch.setattr(kernels, "MIN_VALUES", 0)
    model = tiny_captioner(vocab).model.eval()
    torch.manual_seed(3)
    k, groups, length = 3, 2, 5
    x_img = torch.randn(groups, 6).repeat_interleave(k, dim=0)
    tokens = torch.randint(4, len(vocab), (groups, length)).repeat_interleave(k, dim=0)
    a, b = x_img.clone().requires_grad_(True), x_img.clone().requires_grad_(True)
    shared = model.teacher_forced(a, tokens, shared_rows=k)
    plain = model.teacher_forced(b, tokens)
    assert type(shared.hidden.grad_fn.next_functions[0][0]).__name__ == \
        "_SharedRowsLSTMBackward"
    torch.testing.assert_close(shared.hidden, plain.hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared.token_logprobs(), plain.token_logprobs(), rtol=1e-5,
                               atol=1e-6)
    # the packed weights are what ran (or none were packed)
    cached = {id(w) for w in (model.lstm.weight_ih_l0, model.lstm.weight_hh_l0,
                              model.logit.weight)} & set(kernels._PACKED)
    assert len(cached) == (3 if packed else 0)
    weights = torch.randn(plain.hidden.shape)  # every row its own output gradient
    got, = torch.autograd.grad((shared.hidden * weights).sum(), a)
    want, = torch.autograd.grad((plain.hidden * weights).sum(), b)
    assert (want[0] - want[1]).abs().max() > 1e-3  # rows of one group differ
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # rows read up to different steps, out of order, one on no step at all (the backward
    # takes the rows still carrying a gradient as a prefix)
    last = torch.tensor([3, -1, 1]).repeat(groups)  # row u*K+j: its last step
    masked = weights * (torch.arange(length)[None, :, None] <= last[:, None, None])
    shared = model.teacher_forced(a, tokens, shared_rows=k)
    plain = model.teacher_forced(b, tokens)
    got, = torch.autograd.grad((shared.hidden * masked).sum(), a)
    want, = torch.autograd.grad((plain.hidden * masked).sum(), b)
    assert got[1].abs().max() == 0 and want[0].abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a non-contiguous output gradient (as autograd may hand one over)
    shared = model.teacher_forced(a, tokens, shared_rows=k)
    plain = model.teacher_forced(b, tokens)
    strided = torch.randn(plain.hidden.shape[1], plain.hidden.shape[0],
                          plain.hidden.shape[2]).transpose(0, 1)
    got, = torch.autograd.grad(shared.hidden, a, strided)
    want, = torch.autograd.grad(plain.hidden, b, strided)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # rows that are not equal within their group (other tokens) keep nn.LSTM
    other = tokens.clone()
    other[1, 0] = (other[0, 0] + 1 - 4) % (len(vocab) - 4) + 4
    mixed = model.teacher_forced(a, other, shared_rows=k)
    assert type(mixed.hidden.grad_fn.next_functions[0][0]).__name__ != \
        "_SharedRowsLSTMBackward"
    # in training mode the model keeps nn.LSTM (weights get their gradients)
    model.train()
    trained = model.teacher_forced(x_img, tokens, shared_rows=k)
    assert type(trained.hidden.grad_fn.next_functions[0][0]).__name__ != \
        "_SharedRowsLSTMBackward"
