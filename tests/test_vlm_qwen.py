"""Qwen2-VL and Qwen2.5-VL from tiny saved folders: token grids, per-token maps, commands.

The folders are built by tests/vlm_tiny_b.py with the real transformers classes and
processors, saved with save_pretrained and loaded back by path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmexplain.adapters.tokengrid import window_grid

transformers = pytest.importorskip("transformers")
import vlm_tiny_b as tiny  # noqa: E402


def _peak(acts: torch.Tensor) -> tuple[int, ...]:
    flat = acts[0].abs().sum(0)
    return tuple(int(i) for i in torch.unravel_index(flat.argmax(), flat.shape))


def _patch_cells(processor, height: int, width: int, patch: int) -> torch.Tensor:
    """The raster patch index of every row of the processor's pixel_values: a picture
    whose every patch holds its own index (as a grey level) through the real processor."""
    rows, cols = height // patch, width // patch
    index = np.arange(rows * cols).reshape(rows, cols)
    picture = np.repeat(np.repeat(index, patch, 0), patch, 1).astype(np.uint8)
    out = processor(images=np.stack([picture] * 3, -1), return_tensors="pt",
                    do_normalize=False, do_rescale=False)
    assert out["image_grid_thw"].tolist() == [[1, rows, cols]]
    return out["pixel_values"][:, 0].round().long()  # first value of each patch row


@pytest.mark.parametrize("cell", [(0, 0), (3, 11), (9, 5), (7, 13)])
def test_qwen2_5_window_order_planted_cell(cell):
    """Tokens in the order Qwen2.5-VL's blocks see them (the processor's merge order,
    then the model's own window permutation) come back at their raster cell, at the
    blocks and (merged=True) at the merger's own output."""
    from transformers.vision_utils import get_vision_window_index

    processor = transformers.Qwen2VLImageProcessor(patch_size=4, merge_size=2,
                                                   temporal_patch_size=2, min_pixels=64,
                                                   max_pixels=64 * 64)
    cells = _patch_cells(processor, 40, 56, 4)  # (140,) raster index of each merge-order row
    thw = torch.tensor([[1, 10, 14]])
    window_index, _ = get_vision_window_index(thw, 2, 16, 4)
    assert not torch.equal(window_index, torch.arange(35))  # windows do reorder here
    seq = cells.view(35, 4)[window_index].flatten()  # as permute_input_for_window_attn
    tokens = torch.zeros(1, 140, 3)
    tokens[0, (seq == cell[0] * 14 + cell[1]).nonzero()[0, 0]] = 5.0
    assert _peak(window_grid((10, 14), window_index)(tokens)) == cell
    merged = torch.zeros(1, 35, 3)  # the merger's output before the reverse index
    merged[0, (window_index == (cell[0] // 2) * 7 + cell[1] // 2).nonzero()[0, 0]] = 5.0
    assert _peak(window_grid((10, 14), window_index, merged=True)(merged)) == (
        cell[0] // 2, cell[1] // 2)


def test_window_grid_round_trip_and_errors():
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(torch.tensor([[1, 12, 8]]), 2, 16, 4)
    layout = window_grid((12, 8), window_index)
    tokens = torch.randn(2, 96, 5)
    assert torch.equal(layout.to_tokens(layout(tokens), tokens), tokens)
    with pytest.raises(ValueError, match="window_index: expected a 1-D LongTensor of the 24"):
        window_grid((12, 8), window_index[:-1])
    with pytest.raises(ValueError, match="grid: expected a patch grid whose sides are multiples"):
        window_grid((11, 8), window_index)


# --------------------------------------------------------------------------- the adapters

import mmexplain as mx  # noqa: E402
from mmexplain.adapters import get_adapter  # noqa: E402
from mmexplain.adapters.qwen_vl import qwen_grid  # noqa: E402
from mmexplain.errors import InputError  # noqa: E402
from mmexplain.tasks.caption import WordLogProbs  # noqa: E402

FAMILIES = {"qwen2-vl": tiny.build_qwen2_vl, "qwen2.5-vl": tiny.build_qwen2_5_vl}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny.saved_folders(tmp_path_factory, "qwen", FAMILIES)


@pytest.fixture(scope="module")
def prepared(folders):
    """name -> (adapter, inputs, shown, context, generated tokens (1, 4))."""
    return _prepared_per_family(folders, "prepare_image", tiny.image(), "describe the image", 4)


def _prepared_per_family(folders, prepare: str, picture, prompt: str, steps: int) -> dict:
    """name -> (adapter, inputs, shown, context, ``steps`` generated tokens)."""
    out = {}
    for name, folder in folders.items():
        adapter = get_adapter(name, path=folder)
        inputs, shown, context = getattr(adapter, prepare)(picture, prompt)
        tokens = adapter.generate(inputs, max_new_tokens=steps, **context)
        out[name] = (adapter, inputs, shown, context, tokens)
    return out


def _own_forward(adapter, inputs, context, tokens):
    """The model's own forward teacher-forced on prompt + tokens[:, :-1] -> the logits
    predicting the tokens, and the sequence's token types (M-RoPE reads them)."""
    full = torch.cat([context["input_ids"], tokens[:, :-1]], 1)
    types = torch.cat([context["mm_token_type_ids"], torch.zeros_like(tokens[:, :-1])], 1)
    prompt = context["input_ids"].shape[1]

    def forward():
        out = adapter.model(input_ids=full, attention_mask=torch.ones_like(full),
                            mm_token_type_ids=types, **inputs)
        return out.logits[:, prompt - 1:]

    return forward, types


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("layer", ["model.visual.blocks.0", "model.visual.merger"])
def test_per_token_maps_equal_the_plain_engine_by_layer_name(prepared, name, layer):
    """Every generated token's map from the adapter (one forward, K backwards) equals
    Grad-CAM by the model's module name (hook, the model's own forward, the token grid:
    merge order / window order restored), and equals a single-token run."""
    adapter, inputs, shown, context, tokens = prepared[name]
    forward, _ = _own_forward(adapter, inputs, context, tokens)
    grid = qwen_grid(adapter.model, inputs["image_grid_thw"], layer)
    shape = (10, 14) if layer.endswith("blocks.0") else (5, 7)
    tiny.check_per_token_maps(adapter, inputs, context, tokens, layer, forward, grid, shape)
    assert shown.shape == (40, 56, 3)


def test_expanded_rows_equal_the_loop(prepared):
    """The engine's expanded strategy (the vision blocks after the layer on B*K rows)
    gives the loop's maps at a vision block of Qwen2.5-VL (windows rebuilt for B*K)."""
    adapter, inputs, _, context, tokens = prepared["qwen2.5-vl"]
    target = WordLogProbs([0, 2])
    cams = [mx.GradCAM(adapter, layer="model.visual.blocks.0", strategy=s)(
        inputs, target=target, tokens=tokens, **context) for s in ("loop", "expand")]
    torch.testing.assert_close(cams[0].maps, cams[1].maps, atol=1e-9, rtol=1e-4)


def test_caption_capability_formats(prepared):
    adapter, inputs, _, context, tokens = prepared["qwen2-vl"]
    from mmexplain.adapters.capabilities import Answer, Caption, Split

    assert isinstance(adapter, Caption) and isinstance(adapter, Answer)
    assert isinstance(adapter, Split) and adapter.default_layer == "model.visual.merger"
    forced = adapter.tokenize(["red dog", "a big blue ball"])
    eos = adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = adapter.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    words = adapter.tokenizer.convert_tokens_to_ids(["red", "dog"])
    assert forced[0].tolist() == [*words, eos, pad, pad]
    assert adapter.decode(forced) == ["red dog", "a big blue ball"]
    assert adapter.word_groups(forced[1]) == [("a", [0]), ("big", [1]), ("blue", [2]),
                                              ("ball", [3])]
    text = adapter.tokenizer.decode(context["input_ids"][0])
    assert text.startswith("<|vision_start|>") and text.count("<|image_pad|>") == 35
    templated, context = prepared["qwen2.5-vl"][0], prepared["qwen2.5-vl"][3]
    words = templated.tokenizer.convert_ids_to_tokens(context["input_ids"][0])
    assert words[:3] == ["<|im_start|>", "user", "<|vision_start|>"]  # the chat template
    assert words[-6:] == ["describe", "the", "image", "<|im_end|>", "<|im_start|>",
                          "assistant"]


def test_answer_scores_sum_the_answer_tokens(prepared):
    """answer_task's target gives log p(answer) = the sum of its tokens' log-probs (the
    head's SequenceOutput on the same prompt), for forced answers too."""
    tiny.check_forced_answers(prepared["qwen2.5-vl"][0], "what is the color ?",
                              ["red", "blue ball"], (5, 7))


def test_prompts_the_processor_cannot_place_an_image_in(prepared):
    adapter = prepared["qwen2-vl"][0]
    with pytest.raises(InputError, match="prompt: expected a prompt with the image token "
                       "'<\\|image_pad\\|>'"):
        adapter.prepare_image(tiny.image(), "<|im_start|>user describe<|im_end|>")
    with pytest.raises(InputError, match="prompt: expected a prompt with one image slot"):
        adapter.prepare_image(tiny.image(), "<|image_pad|> and <|image_pad|>")
    with pytest.raises(InputError, match="image: expected an RGB picture"):
        adapter.prepare_image(np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match="--size: expected no size for a Hugging Face model"):
        adapter.prepare_image(tiny.image(), size=224)


def test_a_folder_of_the_other_family_is_named(folders):
    with pytest.raises(InputError, match="qwen2_5_vl.*qwen2.5-vl"):
        get_adapter("qwen2-vl", path=folders["qwen2.5-vl"])
    from mmexplain.adapters.families import family_of

    assert family_of(folders["qwen2-vl"], task="caption") == "qwen2-vl"
    assert family_of(folders["qwen2.5-vl"], task="vqa") == "qwen2.5-vl"


def test_commands_end_to_end(folders, tmp_path, capsys):
    """mmexplain caption / vqa on the saved Qwen2.5-VL folder, the family from its
    config; Qwen2-VL's folder with --model qwen2.5-vl and a templated prompt without
    the image slot: exit 2."""
    tiny.check_commands(folders["qwen2.5-vl"], tmp_path, (5, 7))
    tiny.check_command_errors(folders["qwen2-vl"], "qwen2.5-vl", tmp_path,
                              "<|im_start|>user describe<|im_end|>", capsys)


def test_the_readme_commands_run(folders, tmp_path, capsys):
    tiny.check_readme_commands({"Qwen2-VL-2B-Instruct": folders["qwen2-vl"],
                                "Qwen2.5-VL-3B-Instruct": folders["qwen2.5-vl"]},
                               tmp_path, capsys, 3)


def test_eval_pointing_on_coco(folders, tmp_path, capsys):
    tiny.check_eval_pointing(folders["qwen2.5-vl"], tmp_path, capsys)


# --------------------------------------------------------------------------- video input


def _clip(frames: int = 5, height: int = 40, width: int = 56) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def test_video_tubelets_in_the_processors_order_come_back_at_their_cell():
    """A clip whose every tubelet patch holds its own (t', row, col) index as a grey level,
    through the real video processor: the merge-order rows put back by the 3-D merge grid
    give the raster cube of indices (3 tubelets of 2 frames, the last frame repeated)."""
    from mmexplain.adapters.tokengrid import merge_grid

    processor = transformers.Qwen2VLVideoProcessor(
        patch_size=4, merge_size=2, temporal_patch_size=2, cap_pixels_per_frame=False,
        size={"shortest_edge": 64, "longest_edge": 64 * 64})
    t, rows, cols = 3, 4, 6
    index = np.arange(t * rows * cols).reshape(t, rows, cols)
    clip = np.repeat(np.repeat(np.repeat(index, 2, 0)[:5], 4, 1), 4, 2).astype(np.uint8)
    out = processor(videos=[np.stack([clip] * 3, -1)], return_tensors="pt",
                    do_normalize=False, do_rescale=False)
    assert out["video_grid_thw"].tolist() == [[t, rows, cols]]
    cells = out["pixel_values_videos"][:, 0].round()  # one value of each tubelet patch row
    cube = merge_grid((t, rows, cols), 2)(cells.view(1, -1, 1))[0, 0]
    assert torch.equal(cube, torch.as_tensor(index, dtype=cube.dtype))


@pytest.fixture(scope="module")
def clips(folders):
    """name -> (adapter, inputs, shown, context, generated tokens (1, 3)) for a 5-frame clip."""
    return _prepared_per_family(folders, "prepare_video", _clip(), "describe the clip", 3)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("layer", ["model.visual.blocks.0", "model.visual.merger"])
def test_video_per_token_maps_over_tubelets_equal_the_plain_engine(clips, name, layer):
    """Per generated token, maps over (t', h, w) from the adapter equal Grad-CAM by module
    name on the model's own video forward (pixel_values_videos, video_grid_thw, M-RoPE
    from its token types), the merge / window order restored frame by frame."""
    adapter, inputs, shown, context, tokens = clips[name]
    forward, types = _own_forward(adapter, inputs, context, tokens)
    assert int((types == 2).sum()) == 3 * 5 * 7  # video tokens: 3 tubelets of 5 x 7 merged
    grid = qwen_grid(adapter.model, inputs["video_grid_thw"], layer)
    shape = (3, 10, 14) if layer.endswith("blocks.0") else (3, 5, 7)
    expl = tiny.check_per_token_maps(adapter, inputs, context, tokens, layer, forward, grid,
                                     shape)
    assert shown.shape == (5, 40, 56, 3)
    per_frame = adapter.frame_maps(expl.maps, 5)  # frames 0-1 -> t' 0, 2-3 -> 1, 4 -> 2
    assert per_frame.shape[2] == 5
    for frame, tubelet in enumerate([0, 0, 1, 1, 2]):
        assert torch.equal(per_frame[:, :, frame], expl.maps[:, :, tubelet])
    with pytest.raises(InputError, match="frames: expected at most 6 frames for 3 tubelets"):
        adapter.frame_maps(expl.maps, 7)


def test_video_forced_answers_and_errors(clips):
    """Forced answers about a clip (answer_task: the question's prompt built for the clip,
    its video tokens counted on a blank clip of its size) score log p(answer) = the sum of
    the answer's token log-probs with the clip prepared with that question; maps over
    (t', h', w'). Bad clips and inputs name the argument."""
    import mmexplain as mx

    adapter, inputs, _, context, _ = clips["qwen2-vl"]
    question, answers = "what moves ?", ["red", "blue ball"]
    adapter.encode(inputs)
    prompt = adapter.prompt_context(question)
    assert int((prompt["mm_token_type_ids"] == 2).sum()) == 3 * 5 * 7
    ctx, target = adapter.answer_task(question, answers)
    expl = mx.GradCAM(adapter)(inputs, target=target, **ctx)
    assert tuple(expl.maps.shape) == (1, 2, 3, 5, 7)
    asked, _, asked_context = adapter.prepare_video(_clip(), question)
    for c, answer in enumerate(answers):
        tokens = adapter.tokenize([answer])
        steps = WordLogProbs(list(range(tokens.shape[1])))
        seq = mx.GradCAM(adapter)(asked, target=steps, tokens=tokens, **asked_context)
        torch.testing.assert_close(expl.scores[0, c], seq.scores.sum(), atol=1e-4, rtol=1e-5)
    with pytest.raises(InputError, match=r"frames: expected a clip of RGB frames \(T, H, W, 3\)"):
        adapter.prepare_video(_clip()[0])
    with pytest.raises(InputError, match="inputs: expected the processor's image inputs"):
        adapter.encode({"pixel_values_videos": inputs["pixel_values_videos"]})
    with pytest.raises(InputError, match="prompt: expected a prompt with the video token "
                       "'<\\|video_pad\\|>' where the clip goes"):
        adapter.prepare_video(_clip(), "<|im_start|>user what moves ?<|im_end|>")


SHARED_CLIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "video" / "armwrestling.mp4"


def test_caption_and_vqa_commands_explain_a_video_file(folders, tmp_path, capsys):
    """``mmexplain caption CLIP.mp4 --weights QWEN_DIR --frames 4``: four frames spread over
    the video, per-word maps over (t', h', w') equal to the library call on those frames,
    one overlay MP4 per word with each frame's tubelet map; ``vqa`` with a forced answer;
    a model that reads no video names the mistake."""
    from mmexplain.cli import main
    from mmexplain.data.video import read_uniform_frames, read_video
    from mmexplain.tasks.caption import explain_caption

    if not SHARED_CLIP.is_file():
        pytest.skip(f"{SHARED_CLIP} is absent (the shared data lives beside the project)")
    folder = folders["qwen2-vl"]
    out = tmp_path / "cap"
    assert main(["caption", str(SHARED_CLIP), "--weights", str(folder), "--frames", "4",
                 "--out", str(out), "--max-tokens", "3"]) == 0
    frames, indices = read_uniform_frames(SHARED_CLIP, 4)
    assert indices == [0, 93, 186, 279] and len(read_video(SHARED_CLIP)) == 280
    (npz,) = out.glob("*.npz")
    saved = np.load(npz)
    assert saved["frame_indices"].tolist() == indices
    adapter = get_adapter("qwen2-vl", path=folder)
    inputs, shown, context = adapter.prepare_video(frames, None)
    expl, labels = explain_caption(adapter, inputs, None, "all", "gradcam", max_len=3,
                                   context=context)
    assert saved["labels"].tolist() == list(labels)
    np.testing.assert_allclose(saved["maps"], expl.maps.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert saved["maps"].shape[2:] == (2, *saved["maps"].shape[3:])  # 4 frames: 2 tubelets
    np.testing.assert_array_equal(saved["frame_maps"][:, :, 1], saved["maps"][:, :, 0])
    np.testing.assert_array_equal(saved["frame_maps"][:, :, 2], saved["maps"][:, :, 1])
    assert np.array_equal(saved["image"], shown)
    mp4s = sorted(out.glob("*.mp4"))
    assert len(mp4s) == len(labels)
    assert len(read_video(mp4s[0])) == 4
    out_vqa = tmp_path / "vqa"
    assert main(["vqa", str(SHARED_CLIP), "--weights", str(folder), "--frames", "4",
                 "--question", "what is it ?", "--answers", "red", "--out", str(out_vqa)]) == 0
    saved = np.load(next(out_vqa.glob("*.npz")))
    assert saved["labels"].tolist()[-1] == "red" and saved["maps"].shape[2] == 2
    capsys.readouterr()
    assert main(["caption", str(SHARED_CLIP), "--model", "shapes-captioner",
                 "--out", str(tmp_path / "x")]) == 2
    assert "IMAGE: expected a picture for shapes-captioner, which reads no video" in \
        capsys.readouterr().err
