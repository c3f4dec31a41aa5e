"""The Show-and-Tell captioner adapter, its decoding, and the caption targets.

The adapter must add convenience and never different numbers: every map is
checked against the plain engine run by layer name (hooks) over the same model.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

import mmexplain as mx
from mmexplain.adapters import get_adapter
from mmexplain.adapters.captioner import CaptionerAdapter, caption_mask
from mmexplain.adapters.weights import save_checkpoint
from mmexplain.errors import InputError, InputTypeError
from mmexplain.tasks.caption import (CaptionLogProb, WordLogProbs, caption_words,
                                     explain_caption)
from mmexplain.vocab import Vocabulary, tokenize

WORDS = "a an and red blue green circle square triangle left of".split()
METHODS = [mx.GradCAM, mx.GradCAMPlusPlus]


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary.with_specials(WORDS)


def tiny_captioner(vocab: Vocabulary, seed: int = 0, **kwargs) -> CaptionerAdapter:
    torch.manual_seed(seed)
    sizes = dict(trunk="tiny", trunk_channels=(4, 6, 8), embed_size=6, hidden_size=7)
    return get_adapter("show-tell", vocab=vocab, **{**sizes, **kwargs})


@pytest.fixture
def adapter(vocab: Vocabulary) -> CaptionerAdapter:
    return tiny_captioner(vocab)


def images(batch: int = 2, seed: int = 1, size: int = 16) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(batch, 3, size, size)


def by_hand_logprob(out, tokens: torch.Tensor) -> torch.Tensor:
    """Reference target on the full model's raw output: sum of log p(w_t) up to <end>."""
    lp = out.logprobs.gather(2, tokens.unsqueeze(2)).squeeze(2)  # (B, L)
    keep = torch.ones_like(tokens, dtype=torch.bool)
    for b, row in enumerate(tokens.tolist()):
        stop = row.index(2) if 2 in row else len(row)  # <end> = 2, inclusive
        keep[b, stop + 1:] = False
    return (lp * keep).sum(dim=1, keepdim=True)


# --------------------------------------------------------------------------- vocabulary


def test_vocabulary_encodes_decodes_and_round_trips_through_json(tmp_path: Path) -> None:
    v = Vocabulary.with_specials(["a", "red", "circle", "?"])
    assert v.itos[:4] == ("<pad>", "<start>", "<end>", "<unk>")
    assert (v.pad_id, v.start_id, v.end_id, v.unk_id) == (0, 1, 2, 3)
    assert v.encode("A red CIRCLE", end=True) == [4, 5, 6, 2]
    assert v.encode("a blue circle", start=True, end=True, length=7) == [1, 4, 3, 6, 2, 0, 0]
    assert v.decode([1, 4, 5, 6, 7, 2, 5, 0]) == "a red circle?"
    ids, lengths = v.encode_batch(["a circle", "a red circle"], end=True)
    assert ids.tolist() == [[4, 6, 2, 0], [4, 5, 6, 2]] and lengths.tolist() == [3, 4]
    assert Vocabulary.load(v.save(tmp_path / "v.json")) == v
    assert json.loads((tmp_path / "v.json").read_text())["itos"][4] == "a"

    class ShapesStyle:  # any object with a word list converts (e.g. the shapes world's Vocab)
        words = ("<pad>", "<start>", "<end>", "<unk>", "x")

    assert Vocabulary.coerce(ShapesStyle()).stoi["x"] == 4
    assert tokenize("What's the man's 2nd kite?") == ["what's", "the", "man's", "2nd", "kite", "?"]


def test_vocabulary_errors_name_the_unknown_words() -> None:
    v = Vocabulary.with_specials(["a", "red"])
    with pytest.raises(InputError, match=r"caption: expected words of the vocabulary \(6 words\)"
                                         r", received 'blue', 'kite', not in it"):
        v.encode("a blue kite blue", strict=True, arg="caption")
    answers = Vocabulary(["yes", "no"])  # no <unk>: unknown words always raise
    with pytest.raises(InputError, match="received 'maybe'"):
        answers.encode(["maybe"])
    with pytest.raises(InputError, match=r"<end> token"):
        answers.end_id
    with pytest.raises(InputError, match=r"itos: expected distinct words, received "
                                         r"duplicates \['no'\]"):
        Vocabulary(["no", "yes", "no"])


# --------------------------------------------------------------------------- the model


def test_adapter_offers_the_trunk_stages_and_defaults_to_the_last(adapter: CaptionerAdapter
                                                                  ) -> None:
    assert adapter.layers == ("conv1", "conv2", "conv3")
    assert adapter.layer == "conv3"
    assert adapter.at_layer("conv2").layer == "conv2" and adapter.layer == "conv3"
    assert adapter.weights_source == "random initialisation; trunk: random initialisation"
    assert adapter.encode(images()).shape == (2, 8, 4, 4)


def test_caption_mask_stops_after_the_first_end() -> None:
    tokens = torch.tensor([[4, 5, 2, 0, 0], [4, 2, 6, 2, 0], [4, 5, 6, 7, 8]])
    assert caption_mask(tokens, end_id=2, pad_id=0).int().tolist() == [
        [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer", ["conv2", "conv3"])
def test_caption_maps_equal_the_plain_engine_by_layer_name(adapter: CaptionerAdapter,
                                                           method: type, layer: str,
                                                           device: torch.device) -> None:
    adapter = adapter.to(device)
    x = images().to(device)
    tokens = adapter.caption_context(["a red circle left of a blue square", "a green triangle"]
                                     )["tokens"]
    ours = method(adapter, layer=layer)(x, target=CaptionLogProb(), tokens=tokens)
    plain = method(adapter.model, layer=f"trunk.stages.{layer}")(
        x, target=lambda out: by_hand_logprob(out, tokens), tokens=tokens)
    assert ours.maps.abs().max() > 0
    torch.testing.assert_close(ours.maps, plain.maps, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.scores, plain.scores)
    torch.testing.assert_close(ours.scores[:, 0], adapter.score(x, tokens), rtol=1e-5, atol=1e-6)
    assert ours.layer == layer
    # the training loss is the mean negative log-likelihood per caption token (9 + 4)
    loss = adapter.model.eval().loss(x, tokens)
    torch.testing.assert_close(loss, -adapter.score(x, tokens).sum() / 13, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_word_maps_come_from_one_backward_and_equal_single_word_runs(
        adapter: CaptionerAdapter, method: type) -> None:
    x = images()
    captions = ["a red circle left of a blue square", "a green triangle left of a red square"]
    tokens = adapter.caption_context(captions)["tokens"]  # (2, 9): 8 words + <end>
    positions = list(range(8))
    ours = method(adapter)(x, target=WordLogProbs(positions), tokens=tokens)
    assert ours.strategy == "expand" and ours.maps.shape == (2, 8, 4, 4)
    singles = [method(adapter)(x, target=WordLogProbs([t]), tokens=tokens) for t in positions]
    plain = [method(adapter.model, layer="trunk.stages.conv3")(
        x, target=lambda out, t=t: out.logprobs[:, t].gather(1, tokens[:, t:t + 1]),
        tokens=tokens) for t in positions]
    for t in positions:
        torch.testing.assert_close(ours.maps[:, t], singles[t].maps[:, 0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.maps[:, t], plain[t].maps[:, 0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.scores[:, t], plain[t].scores[:, 0])
    # the words' maps differ: each word is explained by its own gradients
    assert (ours.maps[:, 1] - ours.maps[:, 2]).abs().max() > 0.1 * ours.maps.abs().max()
    # and summing the word log-probs (with <end>) gives the caption's log-prob
    whole = method(adapter)(x, target=CaptionLogProb(), tokens=tokens).scores[:, 0]
    with_end = method(adapter)(x, target=WordLogProbs(positions + [8]), tokens=tokens).scores
    torch.testing.assert_close(with_end.sum(dim=1), whole, rtol=1e-5, atol=1e-5)


def test_own_rows_target_projects_only_each_rows_own_step(adapter: CaptionerAdapter) -> None:
    """The engine's expanded rows (row b*K+j = input b, word j) need log p of word j only:
    OwnWord projects those R steps onto the vocabulary instead of all R*T, and the numbers
    it gives equal the full log-softmax's."""
    x = images()
    tokens = adapter.caption_context(["a red circle left of a blue square",
                                      "a green triangle and a square"])["tokens"]  # (2, 9)
    k, positions = 3, [1, 2, 5]
    rows = tokens.repeat_interleave(k, dim=0)  # (6, 9)
    with torch.no_grad():
        seq = adapter.model.eval()(x.repeat_interleave(k, dim=0), rows)
    assert seq._logprobs is None  # nothing projected yet
    projected = []
    project = seq.project
    seq.project = lambda h: projected.append(h.shape[:-1]) or project(h)
    own = WordLogProbs(positions).own_rows(k)(seq).detach()  # (6, 3)
    assert projected == [torch.Size([6, 1])]  # one step per row, not 6 x 9
    with torch.no_grad():
        full = torch.log_softmax(adapter.model.logit(seq.hidden), dim=-1)  # (6, 9, V)
    ref = full.gather(2, rows.unsqueeze(2)).squeeze(2) * seq.mask  # (6, 9); 0 at padding
    for r in range(6):
        for j in range(k):
            expected = ref[r, positions[j]] if j == r % k else 0.0
            assert float(own[r, j]) == pytest.approx(float(expected), abs=1e-6)
    at = seq.token_logprobs_at(torch.tensor([[1, 7]] * 6)).detach()  # the lazy path
    torch.testing.assert_close(at, ref[:, [1, 7]])
    assert float(at[5, 1]) == 0.0 and float(at[0, 1]) < 0  # padding scores 0
    torch.testing.assert_close(seq.token_logprobs(), ref)  # and the eager one


def test_max_pooling_is_kept_in_the_checkpoint_and_named_when_wrong(
        vocab: Vocabulary, tmp_path: Path) -> None:
    model = tiny_captioner(vocab, pooling="max").model.eval()
    x = images()
    fmap = model.feature_map(x)  # (2, 8, 4, 4)
    torch.testing.assert_close(model.embed_image(fmap),
                               model.image_proj(fmap.amax(dim=(2, 3))))
    assert not torch.allclose(model.embed_image(fmap), model.image_proj(fmap.mean(dim=(2, 3))))
    path = save_checkpoint(model, tmp_path / "max.safetensors")
    loaded = get_adapter("show-tell", weights=path)
    assert loaded.model.pooling == "max"
    tokens = loaded.caption_context(["a red circle"] * 2)["tokens"]
    torch.testing.assert_close(loaded.score(x, tokens), CaptionerAdapter(model).score(x, tokens))
    both = tiny_captioner(vocab, pooling="avg+max").model.eval()
    assert both.image_proj.in_features == 16
    fmap = both.feature_map(x)
    torch.testing.assert_close(both.embed_image(fmap), both.image_proj(
        torch.cat([fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))], dim=1)))
    with pytest.raises(InputError, match=r"pooling: expected one of \['avg', 'avg\+max', 'max'\], "
                                         r"received str 'mean'"):
        tiny_captioner(vocab, pooling="mean")


def test_word_targets_by_word_and_per_input_positions_agree_with_positions(
        adapter: CaptionerAdapter, vocab: Vocabulary) -> None:
    x = images()
    tokens = adapter.caption_context(["a red circle left of a blue square",
                                      "a blue triangle and a red square"])["tokens"]
    cam = mx.GradCAM(adapter)
    by_word = cam(x, target=WordLogProbs(words=["red", "square"], vocab=vocab), tokens=tokens)
    assert by_word.strategy == "expand"
    per_input = cam(x, target=WordLogProbs(torch.tensor([[1, 7], [5, 6]])), tokens=tokens)
    assert per_input.strategy == "expand"
    for b, (red, square) in enumerate([(1, 7), (5, 6)]):
        ref = cam(x[b:b + 1], target=WordLogProbs([red, square]), tokens=tokens[b:b + 1])
        torch.testing.assert_close(by_word.maps[b], ref.maps[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(per_input.maps[b], ref.maps[0], rtol=1e-4, atol=1e-6)


def test_word_target_errors_name_the_words(adapter: CaptionerAdapter, vocab: Vocabulary) -> None:
    x = images(1)
    tokens = adapter.caption_context("a red circle")["tokens"]
    with pytest.raises(InputError, match=r"words: expected words of the vocabulary .*received "
                                         r"'kite', 'dog', not in it"):
        WordLogProbs(words=["red", "kite", "dog"], vocab=vocab)
    with pytest.raises(InputError, match=r"received 'square', not in the caption of input row 0"):
        mx.GradCAM(adapter)(x, target=WordLogProbs(words=["red", "square"], vocab=vocab),
                            tokens=tokens)
    with pytest.raises(InputError, match=r"positions: expected positions inside the caption .*"
                                         r"positions \[1, 4\] for captions of \[4\] tokens"):
        mx.GradCAM(adapter)(x, target=WordLogProbs([1, 4]), tokens=tokens)
    with pytest.raises(InputError, match=r"captions\[0\]: expected words of the vocabulary .*"
                                         r"received 'kite'"):
        adapter.caption_context("a red kite")
    # a caption batch that fits neither the images nor 1: every strategy names the batch
    # the user passed (the expanded path repeats the captions per word before the head)
    three = adapter.caption_context(["a red circle"] * 3)["tokens"]  # (3, 4) for 2 images
    for strategy in ("expand", "loop"):
        with pytest.raises(InputError, match=r"tokens: expected a \(B, L\) tensor of caption "
                                             r"ids with B = 2 \(or 1\).*received tensor of "
                                             r"shape \(3, 4\)"):
            mx.GradCAM(adapter, strategy=strategy)(images(2), target=WordLogProbs([0, 1]),
                                                   tokens=three)


def test_caption_words_picks_visual_words_and_repeated_words_in_order(vocab: Vocabulary) -> None:
    cw = caption_words(vocab, "A red circle left of a red square", "visual")
    assert cw.tokens.tolist() == [[4, 7, 10, 13, 14, 4, 7, 11, 2]]
    assert (cw.positions, cw.words) == ([1, 2, 6, 7], ["red", "circle", "red", "square"])
    cw = caption_words(vocab, "a red circle left of a red square", ["red", "red", 2])
    assert (cw.positions, cw.words) == ([1, 6, 2], ["red", "red", "circle"])
    with pytest.raises(InputError, match=r"received 'blue', not in it"):
        caption_words(vocab, "a red circle", ["blue"])
    with pytest.raises(InputError, match=r"caption: expected words of the vocabulary .*"
                                         r"received 'kite'"):
        caption_words(vocab, "a red kite")
    with pytest.raises(InputError, match=r"words: .*received 'kite', not in it"):
        caption_words(vocab, "a red circle", ["kite"])


# --------------------------------------------------------------------------- decoding


def test_greedy_decoding_equals_beam_search_with_beam_one(adapter: CaptionerAdapter) -> None:
    x = images(3)
    for seed in range(4):
        model = tiny_captioner(adapter.vocab, seed=seed).model.eval()
        greedy = model.greedy(x, max_len=8)
        beam = model.beam_search(x, beam_size=1, max_len=8)
        assert greedy.tokens.tolist() == beam.tokens.tolist()
        assert greedy.texts == beam.texts
        torch.testing.assert_close(greedy.logprobs, beam.logprobs)


def test_beam_search_beats_greedy_and_scores_are_teacher_forced(vocab: Vocabulary) -> None:
    x = images(3)
    for seed in range(4):
        adapter = tiny_captioner(vocab, seed=seed)
        greedy = adapter.captions(x, max_len=8)
        beam = adapter.captions(x, max_len=8, beam_size=4)
        assert bool((beam.logprobs >= greedy.logprobs - 1e-5).all())
        # the teacher-forced score of a generated caption is its accumulated log-prob
        for gen in (greedy, beam):
            torch.testing.assert_close(adapter.score(x, gen.tokens), gen.logprobs, rtol=1e-5,
                                       atol=1e-5)
            assert gen.texts == [adapter.vocab.decode(row) for row in gen.tokens]
            assert gen.words == [t.split() for t in gen.texts]


def test_a_wide_beam_finds_the_most_likely_caption_exhaustively() -> None:
    vocab = Vocabulary.with_specials(["x", "y"])  # <end>, <unk>, x, y can be generated
    torch.manual_seed(3)
    adapter = get_adapter("show-tell", vocab=vocab, trunk="tiny", trunk_channels=(3,),
                          embed_size=4, hidden_size=5)
    x = images(2, size=8)
    max_len, allowed = 3, [2, 3, 4, 5]
    # every caption: 1..3 tokens ending with <end>, or 3 tokens without (truncated)
    seqs = [list(s) + [2] for n in range(max_len) for s in itertools.product(allowed[1:], repeat=n)]
    seqs += [list(s) for s in itertools.product(allowed[1:], repeat=max_len)]
    width = max(len(s) for s in seqs)
    tokens = torch.tensor([s + [0] * (width - len(s)) for s in seqs])  # (N, L)
    for b in range(2):
        scores = adapter.score(x[b:b + 1].expand(len(seqs), -1, -1, -1), tokens)
        beam = adapter.captions(x[b:b + 1], max_len=max_len, beam_size=len(seqs))
        torch.testing.assert_close(beam.logprobs[0], scores.max(), rtol=1e-5, atol=1e-5)
        best = seqs[int(scores.argmax())]
        assert beam.tokens[0, :len(best)].tolist() == best


def test_explain_caption_explains_the_generated_caption_or_its_words(
        adapter: CaptionerAdapter) -> None:
    x = images(1)
    gen = adapter.captions(x, max_len=8, beam_size=2)
    expl, labels = explain_caption(adapter, x[0], beam_size=2, max_len=8)
    assert labels == gen.texts
    torch.testing.assert_close(expl.scores[0, 0], gen.logprobs[0], rtol=1e-5, atol=1e-5)
    ref = mx.GradCAM(adapter)(x, target=CaptionLogProb(), tokens=gen.tokens)
    torch.testing.assert_close(expl.maps, ref.maps)

    caption = "a red circle left of a blue square"
    expl, labels = explain_caption(adapter, x, caption, words="visual", method="gradcam++",
                                   layer="conv2")
    assert labels == ["red", "circle", "blue", "square"] and expl.strategy == "expand"
    tokens = adapter.caption_context(caption)["tokens"]
    ref = mx.GradCAMPlusPlus(adapter, layer="conv2")(x, target=WordLogProbs([1, 2, 6, 7]),
                                                     tokens=tokens)
    torch.testing.assert_close(expl.maps, ref.maps)
    with pytest.raises(InputError, match=r"method: expected one of gradcam, gradcam\+\+, .*received 'cam'; "
                           r"closest: 'gradcam'"):
        explain_caption(adapter, x, caption, method="cam")


# --------------------------------------------------------------------------- errors


def test_a_bad_layer_lists_the_closest(adapter: CaptionerAdapter) -> None:
    with pytest.raises(InputError, match=r"layer: expected one of the target layers of "
                                         r"show-tell, received 'conv4'; closest available: "
                                         r"'conv3', 'conv2'"):
        adapter.at_layer("conv4")
    with pytest.raises(InputError, match=r"received 'conv_3'; closest available: 'conv3'"):
        mx.GradCAM(adapter, layer="conv_3")


def test_head_context_errors_name_the_argument(adapter: CaptionerAdapter) -> None:
    x = images(1)
    with pytest.raises(InputError, match=r"tokens: expected the caption to score as context"):
        mx.GradCAM(adapter)(x, target=CaptionLogProb())
    with pytest.raises(InputError, match=r"context: expected only tokens for the show-tell "
                                         r"adapter, received unknown keys \['token'\]"):
        mx.GradCAM(adapter)(x, target=CaptionLogProb(), token=torch.tensor([[4, 2]]))
    with pytest.raises(InputError, match=r"tokens: expected ids in \[0, 15\)"):
        mx.GradCAM(adapter)(x, target=CaptionLogProb(), tokens=torch.tensor([[4, 99]]))
    with pytest.raises(InputTypeError, match=r"tokens: expected a long tensor"):
        mx.GradCAM(adapter)(x, target=CaptionLogProb(), tokens=torch.tensor([[4.0, 2.0]]))
    with pytest.raises(InputError, match=r"beam_size: expected a positive int, received int 0"):
        adapter.captions(x, beam_size=0)


# --------------------------------------------------------------------------- weights


def test_checkpoint_with_its_config_rebuilds_the_same_model(adapter: CaptionerAdapter,
                                                            tmp_path: Path) -> None:
    x = images()
    tokens = adapter.caption_context(["a red circle", "a blue square"])["tokens"]
    for name in ("model.safetensors", "model.pt"):
        path = save_checkpoint(adapter.model, tmp_path / name)
        loaded = get_adapter("show-tell", weights=path, layer="conv2")  # no other argument
        assert loaded.weights_source == f"checkpoint {path}"
        assert loaded.vocab == adapter.vocab and loaded.layer == "conv2"
        torch.testing.assert_close(loaded.score(x, tokens), adapter.score(x, tokens))


def test_plain_state_dict_loads_and_a_mismatch_names_the_keys(adapter: CaptionerAdapter,
                                                              vocab: Vocabulary,
                                                              tmp_path: Path) -> None:
    state = adapter.model.state_dict()
    torch.save(state, tmp_path / "plain.pth")
    sizes = dict(vocab=vocab, trunk="tiny", trunk_channels=(4, 6, 8), embed_size=6)
    loaded = get_adapter("show-tell", weights=tmp_path / "plain.pth", hidden_size=7, **sizes)
    assert torch.equal(loaded.model.logit.weight, adapter.model.logit.weight)
    with pytest.raises(InputError, match=r"weights: expected a checkpoint of this ShowTell .*"
                                         r"keys of another shape 'lstm.weight_ih_l0 \(28, 6\) "
                                         r"\(model: \(32, 6\)\)'"):
        get_adapter("show-tell", weights=tmp_path / "plain.pth", hidden_size=8, **sizes)
    broken = {k: v for k, v in state.items() if k != "logit.bias"}
    broken["head.extra"] = torch.zeros(1)
    torch.save({"state_dict": broken}, tmp_path / "broken.pt")
    with pytest.raises(InputError, match=r"missing keys 'logit.bias'; unexpected keys "
                                         r"'head.extra'"):
        get_adapter("show-tell", weights=tmp_path / "broken.pt", hidden_size=7, **sizes)
    with pytest.raises(InputError, match=r"weights: expected a checkpoint file that exists"):
        get_adapter("show-tell", weights=tmp_path / "absent.pt", **sizes)
    with pytest.raises(InputError, match=r"vocab: expected the caption vocabulary"):
        get_adapter("show-tell", trunk="tiny")


def test_trunk_weights_come_from_the_torch_cache_or_stay_random(
        vocab: Vocabulary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    sizes = dict(vocab=vocab, trunk="resnet18", embed_size=4, hidden_size=4)
    empty = get_adapter("show-tell", **sizes)
    random = get_adapter("show-tell", weights=False, **sizes)  # the CLI's "--weights random"
    assert random.weights_source == ("random initialisation; trunk: random initialisation "
                                     "(trunk_weights=False)")
    assert empty.weights_source == ("random initialisation; trunk: random initialisation (no "
                                    f"torchvision resnet18 weights in {tmp_path}/checkpoints)")
    assert empty.layers == ("stem", "layer1", "layer2", "layer3", "layer4")
    assert empty.layer == "layer4"
    torch.manual_seed(5)
    reference = torchvision.models.resnet18(weights=None)
    (tmp_path / "checkpoints").mkdir()
    path = tmp_path / "checkpoints" / "resnet18-f37072fd.pth"
    torch.save(reference.state_dict(), path)
    cached = get_adapter("show-tell", **sizes)
    assert cached.weights_source == ("random initialisation; trunk: torchvision "
                                     f"ResNet18_Weights.IMAGENET1K_V1 from {path}")
    stages = cached.model.trunk.stages
    assert torch.equal(stages["layer4"][1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.equal(stages["stem"][1].running_mean, reference.bn1.running_mean)
    given = get_adapter("show-tell", trunk_weights=path, **sizes)
    assert given.weights_source == f"random initialisation; trunk: file {path}"
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():  # the trunk computes what the torchvision model computes
        ref = reference.eval().layer4(reference.layer3(reference.layer2(reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))))
        torch.testing.assert_close(given.eval().model.trunk.run(x), ref)
    with pytest.raises(InputError, match=r"trunk_weights: expected a torchvision resnet18 "
                                         r"weights file that exists"):
        get_adapter("show-tell", trunk_weights=tmp_path / "nope.pth", **sizes)


def test_vgg16_trunk_splits_at_conv5_3_and_loads_only_the_features(
        vocab: Vocabulary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models.vgg import cfgs, make_layers

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    torch.manual_seed(6)
    features = make_layers(cfgs["D"]).eval()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # a classifier's keys are ignored
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / "vgg16-397923af.pth")
    adapter = get_adapter("show-tell", vocab=vocab, trunk="vgg16", embed_size=4, hidden_size=4)
    assert adapter.layers == ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3", "pool5")
    assert adapter.layer == "conv5_3"
    assert "VGG16_Weights.IMAGENET1K_V1" in adapter.weights_source
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():  # conv5_3 is the ReLU output before pool5, after ImageNet normalisation
        normed = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        torch.testing.assert_close(adapter.eval().encode(x), features[:30](normed))
