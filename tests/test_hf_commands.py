"""`mmexplain caption` / `vqa` / `classify` on Hugging Face model folders, as a user runs them.

Tiny random BLIP caption, BLIP VQA and ViT-GPT2 models are saved once (with their
tokenizer and image processor, tests/hf_tiny.py) and run through
``mmexplain.cli.main``: one PNG per word, the .npz's words and maps, maps equal to
the plain engine on the model's own forward (layer by name, ViT tokens reshaped to
their grid), and every bad input an exit code 2 with a message naming it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

import mmexplain as mx
from mmexplain.adapters import get_adapter
from mmexplain.adapters.hf import vit_token_grid
from mmexplain.cli import main
from mmexplain.errors import InputError

transformers = pytest.importorskip("transformers")

import hf_tiny  # noqa: E402

CAPTIONERS = {"blip-caption": "vision_model.encoder.layers.1",
              "hf-vision-encoder-decoder": "encoder.layernorm"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three folders, a bf16 BLIP captioner, an fp16 ViT-GPT2, and a picture file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("hf")
    torch.set_num_threads(1)
    out = {name: hf_tiny.save_folder(name, root / name) for name in hf_tiny.FAMILIES}
    out["bf16"] = hf_tiny.save_folder("blip-caption", root / "bf16", dtype=torch.bfloat16)
    out["fp16"] = hf_tiny.save_folder("hf-vision-encoder-decoder", root / "fp16",
                                      dtype=torch.float16)
    out["image"] = root / "photo.png"
    Image.fromarray(hf_tiny.image()).save(out["image"])
    return out


def run(*argv: object) -> int:
    return main([str(a) for a in argv])


class GroupLogProbs:
    """The reference target: log p(word) = the sum of its tokens' log-probabilities, from
    the model's own logits (B, T, V) of the teacher-forced caption ``tokens``."""

    def __init__(self, tokens: torch.Tensor, groups: list[list[int]]) -> None:
        self.tokens, self.groups = tokens, groups

    def __call__(self, outputs: object) -> torch.Tensor:
        lp = outputs.logits.float().log_softmax(-1).gather(2, self.tokens.unsqueeze(2))[..., 0]
        return torch.stack([lp[:, g].sum(1) for g in self.groups], dim=1)  # (B, K)


def reference_maps(name: str, folder: Path, layer: str, px: torch.Tensor,
                   tokens: torch.Tensor, groups: list[list[int]]) -> mx.Explanation:
    """The plain engine on the model's own forward, hooked by layer name."""
    cls = getattr(transformers, hf_tiny.FAMILIES[name])
    model = cls.from_pretrained(folder, local_files_only=True).eval()
    start = model.config.decoder_start_token_id if name.startswith("hf-") else hf_tiny.START
    shifted = torch.cat([torch.full_like(tokens[:, :1], start), tokens[:, :-1]], dim=1)
    key = "decoder_input_ids" if name.startswith("hf-") else "input_ids"
    cam = mx.GradCAM(model, layer=layer, strategy="loop",
                     reshape=functools.partial(vit_token_grid, num_prefix_tokens=1))
    return cam({"pixel_values": px}, target=GroupLogProbs(tokens, groups), **{key: shifted})


@pytest.mark.parametrize("name", sorted(CAPTIONERS))
def test_caption_writes_a_map_per_word_equal_to_the_plain_engine(name: str, saved, tmp_path,
                                                                  capsys) -> None:
    layer = CAPTIONERS[name]
    assert run("caption", saved["image"], "--weights", saved[name], "--layer", layer,
               "--max-tokens", 8, "--out", tmp_path) == 0
    out = capsys.readouterr().out
    npz = np.load(tmp_path / f"photo_{name}_gradcam.npz")
    adapter = get_adapter(name, path=saved[name])
    px, shown, _ = adapter.prepare_image(hf_tiny.image())
    tokens = adapter.generate(px, max_new_tokens=8)
    groups = adapter.word_groups(tokens[0])
    words = [w for w, _ in groups]
    assert words and npz["labels"].tolist() == words
    assert f"caption: {' '.join(words)}" in out
    assert npz["maps"].shape == (1, len(words), hf_tiny.SIZE // hf_tiny.PATCH,
                                 hf_tiny.SIZE // hf_tiny.PATCH)
    assert len(list(tmp_path.glob(f"photo_{name}_gradcam_*.png"))) == len(words)
    np.testing.assert_array_equal(npz["image"], shown)
    ref = reference_maps(name, saved[name], layer, px, tokens, [g for _, g in groups])
    np.testing.assert_allclose(npz["scores"], ref.scores.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(npz["maps"], ref.maps.numpy(), rtol=1e-4, atol=1e-6)
    assert np.abs(npz["maps"]).max() > 0


def test_a_word_of_several_tokens_is_their_summed_log_probability(saved) -> None:
    """ViT-GPT2's BPE: "circles" = "Ġcircle" + "s", one word, one map."""
    from mmexplain.tasks.caption import WordGroupLogProbs, explain_caption

    adapter = get_adapter("hf-vision-encoder-decoder", path=saved["hf-vision-encoder-decoder"])
    px, _, _ = adapter.prepare_image(hf_tiny.image())
    tokens = adapter.tokenize(["a red circles"])  # ..., then <|endoftext|>
    groups = adapter.word_groups(tokens[0])
    pieces = adapter.tokenizer.convert_ids_to_tokens(tokens[0, :-1].tolist())
    assert [w for w, _ in groups] == ["a", "red", "circles"] and pieces[-1] == "s"
    assert [t for _, g in groups for t in g] == list(range(len(pieces)))  # every token once
    last = groups[-1][1]
    assert len(last) == 2  # "Ġcircle" + "s"
    expl, words = explain_caption(adapter, px, "a red circles", words="all")
    assert words == ["a", "red", "circles"]
    ref = reference_maps("hf-vision-encoder-decoder", saved["hf-vision-encoder-decoder"],
                         adapter.layer, px, tokens, [g for _, g in groups])
    torch.testing.assert_close(expl.maps, ref.maps, rtol=1e-4, atol=1e-6)
    per_token = mx.GradCAM(adapter)(px, target=WordGroupLogProbs([[t] for t in last]),
                                    tokens=tokens)
    torch.testing.assert_close(expl.scores[:, 2], per_token.scores.sum(1), rtol=1e-5, atol=1e-6)
    for k, (_, steps) in enumerate(groups):  # K words in one call = K single-word runs
        alone = mx.GradCAM(adapter)(px, target=WordGroupLogProbs([steps]), tokens=tokens)
        torch.testing.assert_close(expl.maps[:, k], alone.maps[:, 0], rtol=1e-4, atol=1e-6)
    blip = get_adapter("blip-caption", path=saved["blip-caption"])  # WordPiece: cir ##cle
    assert blip.word_groups(blip.tokenize(["a red circle ?"])[0]) == [
        ("a", [0]), ("red", [1]), ("circle", [2, 3]), ("?", [4])]


def test_vqa_maps_the_models_answer_and_each_forced_one(saved, tmp_path, capsys) -> None:
    question = "what color is the circle ?"
    assert run("vqa", saved["image"], "--weights", saved["blip-vqa"], "--question", question,
               "--answers", "red,blue square", "--out", tmp_path) == 0
    out = capsys.readouterr().out
    npz = np.load(tmp_path / "photo_blip-vqa_gradcam.npz")
    adapter = get_adapter("blip-vqa", path=saved["blip-vqa"])
    px, _, context = adapter.prepare_image(hf_tiny.image(), question)
    ((own, _),) = adapter.answer(px, question)[0]
    labels = npz["labels"].tolist()
    assert labels == [own, "red", "blue square"] and f"model's answer: {own}" in out
    assert npz["maps"].shape == (1, 3, 4, 4) and str(npz["question"]) == question
    ids = adapter.text_ids([own, "red", "blue square"])  # log p(answer text), summed tokens
    ref = mx.GradCAM(adapter)(px, target=[0, 1, 2], answers=ids, **context)
    np.testing.assert_allclose(npz["scores"], ref.scores.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(npz["maps"], ref.maps.numpy(), rtol=1e-4, atol=1e-6)
    # the answer word by word: the caption command with the question as prompt
    assert run("caption", saved["image"], "--weights", saved["blip-vqa"], "--prompt", question,
               "--max-tokens", 5, "--out", tmp_path / "words") == 0
    npz = np.load(tmp_path / "words" / "photo_blip-vqa_gradcam.npz")
    tokens = adapter.generate(px, max_new_tokens=5, **context)
    assert npz["labels"].tolist() == [w for w, _ in adapter.word_groups(tokens[0])]


def test_device_and_bf16_fp16_models_give_float32_maps(saved, tmp_path) -> None:
    assert run("caption", saved["image"], "--weights", saved["bf16"], "--device", "cpu",
               "--max-tokens", 4, "--out", tmp_path) == 0
    npz = np.load(tmp_path / "photo_blip-caption_gradcam.npz")
    assert npz["maps"].dtype == np.float32 and np.isfinite(npz["maps"]).all()
    adapter = get_adapter("blip-caption", path=saved["bf16"])
    assert next(adapter.model.parameters()).dtype == torch.bfloat16
    px, _, _ = adapter.prepare_image(hf_tiny.image())
    assert adapter.encode(px).dtype == torch.float32
    assert run("caption", saved["image"], "--weights", saved["fp16"], "--max-tokens", 4,
               "--out", tmp_path / "fp16") == 0
    npz = np.load(tmp_path / "fp16" / "photo_hf-vision-encoder-decoder_gradcam.npz")
    assert npz["maps"].dtype == np.float32 and np.isfinite(npz["maps"]).all()


def test_the_family_is_read_from_the_folder(saved) -> None:
    from mmexplain.adapters.families import family_of

    assert family_of(saved["blip-caption"]) == "blip-caption"
    assert family_of(saved["blip-vqa"], task="vqa") == "blip-vqa"
    assert family_of(saved["hf-vision-encoder-decoder"]) == "hf-vision-encoder-decoder"


BAD = [  # (argv after the image, what the message says)
    (["caption", "--weights", "{missing}"], r"--weights: expected a weight file or a Hugging "
     r"Face model folder, received .*absent': there is no such file or folder"),
    (["caption", "--weights", "{empty}"], r"--weights: expected a local folder .*it has no "
     r"config.json"),
    (["caption", "--weights", "{other}"], r"--weights: expected a model folder of a supported "
     r"family \(.*BlipForConditionalGeneration.*\), received .*model_type 'bert' "
     r"\(architectures: BertModel\)"),
    (["vqa", "--question", "what ?", "--weights", "{blip-caption}"], r"--weights: expected a "
     r"model folder that mmexplain vqa can run, .*BlipForConditionalGeneration.*serves caption"),
    (["classify", "--weights", "{blip-caption}"], r"--weights: expected a model folder that "
     r"mmexplain classify can run"),
    (["caption", "--model", "blip-vqa", "--weights", "{blip-caption}"], r"--weights: expected a "
     r"folder of a model 'blip-vqa' runs, .*a folder for 'blip-caption'"),
    (["caption", "--model", "show-tell", "--weights", "{blip-caption}"], r"--weights: expected"),
    (["caption", "--model", "blip-caption", "--weights", "{other}"], r"--weights: expected a "
     r"BlipForConditionalGeneration checkpoint, received .*which holds a BertModel"),
    (["caption", "--weights", "{blip-caption}", "--prompt", " ".join(["a"] * 40)],
     r"prompt: expected a prompt of 1 to 30 tokens"),
    (["caption", "--weights", "{blip-vqa}"], r"prompt: expected the question"),
    (["caption", "--weights", "{blip-caption}", "--caption", " ".join(["red"] * 40)],
     r"tokens: expected a caption of at most 32 tokens after a prompt of 0"),
    (["caption", "--weights", "{blip-caption}", "--size", "64"], r"--size: expected no size"),
    (["caption", "--weights", "{blip-caption}", "--layer", "vision_model.layers.9"],
     r"layer: expected one of the target layers of blip-caption"),
    (["caption", "--weights", "{blip-caption}", "--words", "zebra"],
     r"words: expected words of the caption .*'zebra', not in it"),
    (["vqa", "--model", "blip-caption", "--weights", "{blip-caption}", "--question", "what ?"],
     r"model: expected a model that can answer questions about an image .*\(the Answer "
     r"capability\) for mmexplain vqa, received 'blip-caption', which offers: split, caption"),
    (["caption", "--model", "resnet18", "--weights", "random"], r"model: expected a model that "
     r"can generate and score text about an image \(the Caption capability\)"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_inputs_exit_2_with_a_message_naming_them(argv, message, saved, tmp_path,
                                                      capsys) -> None:
    (tmp_path / "empty").mkdir()
    other = tmp_path / "other"
    transformers.BertModel(transformers.BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=8)).save_pretrained(other)
    names = {**{k: str(v) for k, v in saved.items()}, "missing": str(tmp_path / "absent"),
             "empty": str(tmp_path / "empty"), "other": str(other)}
    argv = [a.format(**names) for a in argv]
    rc = main([argv[0], str(saved["image"]), *argv[1:], "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_an_image_the_processor_rejects_exits_2(saved, tmp_path, capsys) -> None:
    """A processor saved without resizing: a 40 x 50 picture is not the model's 32 x 32;
    an empty picture is refused by the processor itself."""
    import shutil

    folder = tmp_path / "no-resize"
    shutil.copytree(saved["blip-caption"], folder)
    transformers.BlipImageProcessor(do_resize=False).save_pretrained(folder)
    rc = main(["caption", str(saved["image"]), "--weights", str(folder), "--out",
               str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and re_search(r"image: expected an image the processor makes into "
                                 r"\(3, 32, 32\) pixel values \(the model's input\), received "
                                 r"array of shape \(40, 50, 3\) .*made into \(3, 40, 50\)",
                                 err), err
    adapter = get_adapter("blip-caption", path=saved["blip-caption"])
    with pytest.raises(InputError,
                       match=r"image: expected an image the model's processor "
                       r"\(BlipImageProcessor\) accepts, received array of shape \(0, 3, 3\)"):
        adapter.prepare_image(np.zeros((0, 3, 3), dtype=np.uint8))
    tall = np.zeros((3, 100, 3), dtype=np.uint8)  # 3 rows: channels last all the same
    tall[:, :50] = 255
    _, shown, _ = adapter.prepare_image(tall)
    assert shown[:, :10].min() > 200 and shown[:, -10:].max() < 50  # left white, right black


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


README_FOLDERS = {"blip-image-captioning-base": "blip-caption", "blip-vqa-base": "blip-vqa",
                  "vit-gpt2-image-captioning": "hf-vision-encoder-decoder"}


def readme_commands() -> list[tuple[str, str]]:
    """(adapter name, command) of every row of the README's Hugging Face table whose
    family is one of this module's."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Hugging Face vision-language models", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[2].startswith("`mmexplain "):
            continue
        names = re.findall(r"`([a-z0-9.-]+)`", cells[1])
        if names and names[0] in hf_tiny.FAMILIES:
            rows.append((names[0], cells[2].strip("`")))
    return rows


def test_the_readme_lists_every_family_of_this_module() -> None:
    assert {name for name, _ in readme_commands()} == set(hf_tiny.FAMILIES)


@pytest.mark.parametrize("name, command", readme_commands())
def test_each_readme_command_runs_on_the_tiny_folders(name, command, saved, tmp_path,
                                                      capsys) -> None:
    import shlex

    argv = shlex.split(command)[1:]
    argv = [str(saved[README_FOLDERS[a]]) if a in README_FOLDERS else
            str(saved["image"]) if a == "photo.jpg" else a for a in argv]
    assert main([*argv, "--out", str(tmp_path)]) == 0, capsys.readouterr().err
    (npz,) = tmp_path.glob(f"photo_{name}_gradcam.npz")
    labels = np.load(npz)["labels"].tolist()
    assert labels and np.load(npz)["maps"].shape[:2] == (1, len(labels))
    assert len(list(tmp_path.glob("*.png"))) == len(labels)
    if argv[0] == "vqa":
        assert labels[-2:] == ["red", "yellow"]


def test_word_task_finds_a_datasets_words_among_the_models_subwords(saved) -> None:
    from mmexplain.tasks.caption import WordGroupLogProbs, word_task

    adapter = get_adapter("blip-caption", path=saved["blip-caption"])
    # "circle" = cir ##cle; "near" is not in the vocabulary ([UNK], still a word)
    target, context = word_task(adapter, ["a", "red", "circle", "near", "a", "dog"], [2, 3, 5])
    assert isinstance(target, WordGroupLogProbs) and target.groups == [[2, 3], [4], [6]]
    assert context["tokens"].tolist() == [[6, 7, 8, 18, 4, 6, 20, hf_tiny.END]]
    # "dog?" is two words of the model: the dataset's word is both
    target, _ = word_task(adapter, ["a", "dog?", "runs"], [1, 2])
    assert target.groups == [[1, 2], [3]]


@pytest.mark.parametrize("name", ["blip-caption", "hf-vision-encoder-decoder"])
def test_eval_pointing_on_coco_runs_on_a_folder(name, saved, tmp_path, capsys) -> None:
    """`mmexplain eval pointing --dataset coco ... --weights DIR`: the family from the folder,
    the images through its processor, each word's map from its subword tokens."""
    import vlm_tiny_b

    vlm_tiny_b.check_eval_pointing(saved[name], tmp_path, capsys)


def test_model_named_beside_its_folder_and_beam_search(saved, tmp_path, capsys) -> None:
    """The issue's first attempts: --model with --weights DIR, explain_caption with a beam."""
    from mmexplain.tasks.caption import explain_caption

    assert run("caption", saved["image"], "--model", "blip-caption", "--weights",
               saved["blip-caption"], "--words", "caption", "--out", tmp_path) == 0
    npz = np.load(tmp_path / "photo_blip-caption_gradcam.npz")
    assert npz["maps"].shape == (1, 1, 4, 4)  # the whole caption's log-probability
    adapter = get_adapter("blip-caption", path=saved["blip-caption"])
    px, _, _ = adapter.prepare_image(hf_tiny.image())
    beam = adapter.generate(px, max_new_tokens=6, beam_size=3)
    expl, (text,) = explain_caption(adapter, px, beam_size=3, max_len=6)
    assert text == adapter.decode(beam)[0]
    assert run("caption", saved["image"], "--weights", saved["blip-caption"], "--device",
               "nowhere", "--out", tmp_path) == 2
    assert "--device: expected a torch device" in capsys.readouterr().err


def test_vqa_top_answers_come_from_a_beam_search(saved, tmp_path) -> None:
    adapter = get_adapter("blip-vqa", path=saved["blip-vqa"])
    question = "what color is it ?"
    px, _, context = adapter.prepare_image(hf_tiny.image(), question)
    ranked = adapter.answer(px, question, top=3)[0]
    scores = [s for _, s in ranked]
    assert len(ranked) == 3 and scores == sorted(scores, reverse=True)
    tokens = adapter.generate(px, max_new_tokens=10, beam_size=3, num_return_sequences=3,
                              **context)  # the beams, scored as the head scores them
    own = adapter(px, answers=tokens.view(1, 3, -1), **context)[0].tolist()
    np.testing.assert_allclose(sorted(own, reverse=True), scores, rtol=1e-5)
    assert run("vqa", saved["image"], "--weights", saved["blip-vqa"], "--question", question,
               "--top", 3, "--out", tmp_path) == 0
    labels = np.load(tmp_path / "photo_blip-vqa_gradcam.npz")["labels"].tolist()
    assert labels == [a for a, _ in ranked if a.strip()]
