"""Tiny random-weight Hugging Face vision-language models for the tests (no download).

Each builder makes a model of the real transformers class with tiny vision and text
configs, a word-level tokenizer built offline with the family's special tokens, and the
family's real processor; it saves all of them with ``save_pretrained`` into ``folder``
and returns the folder, which loads back by path with ``local_files_only=True`` as a
user's downloaded checkpoint does.

    folder = build_qwen2_vl(tmp_path / "qwen2-vl")

Families: Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, BLIP-2 (OPT and T5), GIT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

WORDS = ("a picture of the an image question answer what is color shape red blue green "
         "yellow dog cat ball box square circle on in left right top bottom yes no there "
         "two one small big and with photo describe this it user assistant : ? . ,").split()
HIDDEN = 32  # text and vision widths
SEED = 0


def word_tokenizer(specials: list[str], *, bos: str | None, eos: str, pad: str,
                   unk: str = "<unk>", extra: tuple[str, ...] = (), **kwargs):
    """A word-level ``PreTrainedTokenizerFast``: ``specials`` first (ids 0..), then WORDS.

    ``bos``/``eos``/``pad``/``unk`` must be among ``specials``; the others become
    additional special tokens (never split, skipped when decoding).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*specials, *WORDS, *extra])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by spaces
    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    others = [t for t in specials if t not in named.values()]
    tok = PreTrainedTokenizerFast(tokenizer_object=core, extra_special_tokens=others,
                                  **{k: v for k, v in named.items() if v is not None}, **kwargs)
    return tok


def image(height: int = 40, width: int = 56, seed: int = 0) -> np.ndarray:
    """A random uint8 RGB picture (H, W, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(folder: Path, model, processor) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _ids(tok, *names: str) -> list[int]:
    return [tok.convert_tokens_to_ids(n) for n in names]


# --------------------------------------------------------------------------- Qwen2-VL / 2.5


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<unk>"]


def _qwen(folder: Path, version: str, layers: int = 1, depth: int = 2) -> Path:
    import transformers as tf

    torch.manual_seed(SEED)
    tok = word_tokenizer(QWEN_SPECIALS, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    pad, eos, start, end, img, vid = _ids(tok, "<|endoftext|>", "<|im_end|>", "<|vision_start|>",
                                          "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    text = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64,
                num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                max_position_embeddings=512, bos_token_id=pad, eos_token_id=eos,
                pad_token_id=pad,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=img, video_token_id=vid, vision_start_token_id=start,
               vision_end_token_id=end)
    if version == "2":
        vision = dict(depth=depth, embed_dim=HIDDEN, hidden_size=HIDDEN, num_heads=2,
                      mlp_ratio=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
        config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        model = tf.Qwen2VLForConditionalGeneration(config)
        processor_cls = tf.Qwen2VLProcessor
    else:
        vision = dict(depth=depth, hidden_size=HIDDEN, out_hidden_size=HIDDEN,
                      intermediate_size=48, num_heads=2, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=16, fullatt_block_indexes=[depth - 1])
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        model = tf.Qwen2_5_VLForConditionalGeneration(config)
        processor_cls = tf.Qwen2_5_VLProcessor
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    images = tf.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                      min_pixels=8 * 8, max_pixels=64 * 64)
    processor = processor_cls(image_processor=images, tokenizer=tok,
                              video_processor=tf.Qwen2VLVideoProcessor(
                                  patch_size=4, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64},
                                  cap_pixels_per_frame=False),
                              chat_template=QWEN_TEMPLATE if version == "2.5" else None)
    return _save(folder, model, processor)


#: Qwen's chat layout, shortened (Qwen2.5-VL's tiny processor has it, Qwen2-VL's none)
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_qwen2_vl(folder: Path, **kwargs) -> Path:
    """Qwen2VLForConditionalGeneration: patch 4, 2x2 merge, 2 vision blocks, 1 text layer."""
    return _qwen(folder, "2", **kwargs)


def build_qwen2_5_vl(folder: Path, **kwargs) -> Path:
    """Qwen2_5_VLForConditionalGeneration: as Qwen2-VL, windows of 2x2 merged tokens
    (window_size 16 px) in block 0, full attention in the last block."""
    return _qwen(folder, "2.5", **kwargs)


# --------------------------------------------------------------------------- Idefics3 / SmolVLM


def _idefics_specials() -> list[str]:
    tiles = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    return ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
            "<image>", "<global-img>", "<unk>", *tiles]


def _idefics(folder: Path, family: str, layers: int = 1, depth: int = 2,
             splitting: bool = True) -> Path:
    import transformers as tf

    torch.manual_seed(SEED)
    tok = word_tokenizer(_idefics_specials(), bos="<|im_start|>", eos="<end_of_utterance>",
                         pad="<|endoftext|>", extra=("User", "Assistant"))
    bos, eos, pad, img = _ids(tok, "<|im_start|>", "<end_of_utterance>", "<|endoftext|>",
                              "<image>")
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=HIDDEN,
                intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=bos,
                eos_token_id=eos, pad_token_id=pad)
    vision = dict(hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=depth,
                  num_attention_heads=2, image_size=16, patch_size=4)
    sizes = dict(do_image_splitting=splitting, size={"longest_edge": 32},
                 max_image_size={"longest_edge": 16})
    seq_len = (16 // 4) ** 2 // 4  # tokens per tile after the 2x2 pixel shuffle
    if family == "idefics3":
        config = tf.Idefics3Config(text_config=text, vision_config=vision, image_token_id=img,
                                   scale_factor=2, pad_token_id=pad)
        model = tf.Idefics3ForConditionalGeneration(config)
        processor = tf.Idefics3Processor(tf.Idefics3ImageProcessor(**sizes), tokenizer=tok,
                                         image_seq_len=seq_len)
    else:
        config = tf.SmolVLMConfig(text_config=text, vision_config=vision, image_token_id=img,
                                  scale_factor=2, pad_token_id=pad)
        model = tf.SmolVLMForConditionalGeneration(config)
        processor = tf.SmolVLMProcessor(tf.SmolVLMImageProcessor(**sizes), tokenizer=tok,
                                        video_processor=tf.SmolVLMVideoProcessor(),
                                        image_seq_len=seq_len)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = bos
    return _save(folder, model, processor)


def build_idefics3(folder: Path, **kwargs) -> Path:
    """Idefics3ForConditionalGeneration: 16 px tiles of 4x4 patches, 2x2 pixel shuffle
    (4 tokens a tile), images up to 32 px split into tiles plus a global image."""
    return _idefics(folder, "idefics3", **kwargs)


def build_smolvlm(folder: Path, **kwargs) -> Path:
    """SmolVLMForConditionalGeneration, sized as :func:`build_idefics3` (its processor
    needs the ``num2words`` package)."""
    return _idefics(folder, "smolvlm", **kwargs)


# --------------------------------------------------------------------------- BLIP-2 and GIT


def _vit(**extra) -> dict:
    return dict(hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=2, image_size=16, patch_size=4, **extra)


def build_blip2(folder: Path, language: str = "opt", layers: int = 1) -> Path:
    """Blip2ForConditionalGeneration: 16 px images of 4x4 patches (+ CLS), a 1-layer
    Q-Former with 4 queries, and a 1-layer OPT (``language="opt"``) or T5 (``"t5"``)."""
    import transformers as tf

    torch.manual_seed(SEED)
    if language == "opt":
        tok = word_tokenizer(["<pad>", "</s>", "<unk>", "<image>"], bos="</s>", eos="</s>",
                             pad="<pad>", add_bos_token=True)
        from tokenizers import processors

        bos_id = tok.convert_tokens_to_ids("</s>")
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", bos_id)])
        pad, eos = _ids(tok, "<pad>", "</s>")
        text = dict(model_type="opt", vocab_size=len(tok), hidden_size=HIDDEN, ffn_dim=64,
                    num_hidden_layers=layers, num_attention_heads=2, word_embed_proj_dim=HIDDEN,
                    max_position_embeddings=256, bos_token_id=eos, eos_token_id=eos,
                    pad_token_id=pad)
    elif language == "t5":
        tok = word_tokenizer(["<pad>", "</s>", "<unk>", "<image>"], bos=None, eos="</s>",
                             pad="<pad>")
        from tokenizers import processors

        pad, eos = _ids(tok, "<pad>", "</s>")
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
        text = dict(model_type="t5", vocab_size=len(tok), d_model=HIDDEN, d_kv=16, d_ff=64,
                    num_layers=layers, num_decoder_layers=layers, num_heads=2,
                    eos_token_id=eos, pad_token_id=pad, decoder_start_token_id=pad)
    else:
        raise ValueError(f"language: expected 'opt' or 't5', received {language!r}")
    image_token = tok.convert_tokens_to_ids("<image>")
    qformer = dict(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=64, encoder_hidden_size=HIDDEN, cross_attention_frequency=1)
    config = tf.Blip2Config(vision_config=_vit(), qformer_config=qformer, text_config=text,
                            num_query_tokens=4, image_token_index=image_token)
    model = tf.Blip2ForConditionalGeneration(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    if language == "t5":
        model.generation_config.decoder_start_token_id = pad
        with torch.no_grad():  # random T5 weights predict padding everywhere: not padding
            model.language_model.lm_head.weight[pad] = 0.0
    else:
        model.generation_config.bos_token_id = eos
    tok.image_token = "<image>"
    processor = tf.Blip2Processor(tf.BlipImageProcessor(size={"height": 16, "width": 16}),
                                  tok, num_query_tokens=4)
    return _save(folder, model, processor)


def build_git(folder: Path, layers: int = 1) -> Path:
    """GitForCausalLM: 16 px images of 4x4 patches (+ CLS), a 1-layer text decoder."""
    import transformers as tf

    torch.manual_seed(SEED)
    tok = word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], bos="[CLS]",
                         eos="[SEP]", pad="[PAD]", unk="[UNK]")
    pad, cls, sep = _ids(tok, "[PAD]", "[CLS]", "[SEP]")
    from tokenizers import processors

    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    config = tf.GitConfig(vision_config=_vit(), vocab_size=len(tok), hidden_size=HIDDEN,
                          num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=128, pad_token_id=pad, bos_token_id=cls,
                          eos_token_id=sep)
    model = tf.GitForCausalLM(config)
    model.generation_config.eos_token_id = sep
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = cls
    images = tf.CLIPImageProcessor(size={"shortest_edge": 16},
                                   crop_size={"height": 16, "width": 16})
    return _save(folder, model, tf.GitProcessor(images, tok))


# --------------------------------------------------------------------------- references


def hook_reference(model, layer: str, forward, tokens: torch.Tensor, grid, method="gradcam"):
    """Per-token Grad-CAM maps of ``tokens`` (1, T) the plain way, by layer name: a forward
    hook on the model's module ``layer`` keeps its output, ``forward()`` runs the model's
    own forward teacher-forced and returns the logits (1, T, V) that predict the T tokens,
    one ``autograd.grad`` per token, the tokens put on the grid by ``grid`` (a TokenGrid:
    the module's output (rows, N, C) read as one input's (1, rows*N, C)) and the method
    from the registry. -> (maps (T, *grid), token log-probs (T,))."""
    from mmexplain.methods import get_method

    kept = {}

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out.retain_grad()
        kept["a"] = out

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        logits = forward()
    finally:
        handle.remove()
    logprobs = logits[0].float().log_softmax(-1).gather(1, tokens[0].unsqueeze(1)).squeeze(1)
    acts = kept["a"]
    steps = tokens.shape[1]
    grads = [torch.autograd.grad(logprobs[k], acts, retain_graph=True)[0] for k in range(steps)]

    def on_grid(t: torch.Tensor) -> torch.Tensor:
        return grid(t.reshape(1, -1, t.shape[-1])).float()

    a = on_grid(acts.detach())
    g = torch.cat([on_grid(x) for x in grads])
    maps, _ = get_method(method).explain(a.expand(steps, *a.shape[1:]), g)
    return maps, logprobs.detach()


def check_per_token_maps(adapter, inputs, context, tokens, layer, forward, grid, shape):
    """The adapter's maps of every token of ``tokens`` (one forward, K backwards, through
    the engine) equal :func:`hook_reference` (``forward``, ``grid`` as there) and a
    single-token run of the last token; the maps have the grid ``shape``."""
    import mmexplain as mx
    from mmexplain.tasks.caption import WordLogProbs

    steps = tokens.shape[1]
    expl = mx.GradCAM(adapter, layer=layer, strategy="loop")(
        inputs, target=WordLogProbs(list(range(steps))), tokens=tokens, **context)
    assert tuple(expl.maps.shape) == (1, steps, *shape)
    maps, logprobs = hook_reference(adapter.model, layer, forward, tokens, grid)
    scale = maps.abs().max()
    assert scale > 0
    torch.testing.assert_close(expl.maps[0], maps, atol=1e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(expl.scores[0], logprobs, atol=1e-5, rtol=1e-5)
    single = mx.GradCAM(adapter, layer=layer)(inputs, target=WordLogProbs([steps - 1]),
                                              tokens=tokens, **context)
    torch.testing.assert_close(single.maps[0, 0], expl.maps[0, -1], atol=1e-6 * scale,
                               rtol=1e-4)
    return expl


def saved_folders(tmp_path_factory, label: str, builds: dict) -> dict:
    """{key: folder} of every builder in ``builds`` ({key: build(folder)}), under one root."""
    root = tmp_path_factory.mktemp(label)
    return {key: build(root / key) for key, build in builds.items()}


def check_forced_answers(adapter, question: str, answers: list, shape: tuple) -> None:
    """answer_task's target scores each answer by the sum of its tokens' log-probs: the
    same number as the head's per-token scores of that answer given as a caption; the
    model's own answer comes with a log-probability (<= 0)."""
    import mmexplain as mx
    from mmexplain.tasks.caption import WordLogProbs

    inputs, _, context = adapter.prepare_image(image(), question)
    ctx, target = adapter.answer_task(question, answers)
    expl = mx.GradCAM(adapter)(inputs, target=target, **ctx)
    assert tuple(expl.maps.shape) == (1, len(answers), *shape)
    for c, answer in enumerate(answers):
        tokens = adapter.tokenize([answer])
        steps = WordLogProbs(list(range(tokens.shape[1])))
        seq = mx.GradCAM(adapter)(inputs, target=steps, tokens=tokens, **context)
        torch.testing.assert_close(expl.scores[0, c], seq.scores.sum(), atol=1e-4, rtol=1e-5)
    own = adapter.answer(inputs, question, **context)
    assert len(own) == 1 and isinstance(own[0][0][0], str) and own[0][0][1] <= 0


# --------------------------------------------------------------------------- commands


def _results(out: Path) -> tuple[dict, list[Path]]:
    """The one .npz a command wrote to ``out`` (as a dict) and its PNGs, sorted."""
    npz = sorted(out.glob("*.npz"))
    assert len(npz) == 1, npz
    with np.load(npz[0]) as data:
        return {k: data[k] for k in data.files}, sorted(out.glob("*.png"))


def check_commands(folder: Path, tmp: Path, shape: tuple, vqa: bool = True) -> None:
    """``mmexplain caption IMG --weights DIR`` and (``vqa``) ``mmexplain vqa IMG --weights DIR
    --question Q --answers A,B`` through ``mmexplain.cli.main`` as a user runs them, the
    family read from the folder: exit 0, one PNG per word of the caption / per answer,
    the .npz's labels and maps (1, K, *shape) right."""
    from PIL import Image

    from mmexplain.cli import main

    picture = tmp / "photo.png"
    Image.fromarray(image()).save(picture)
    rc = main(["caption", str(picture), "--weights", str(folder), "--out", str(tmp / "cap"),
               "--max-tokens", "4"])
    assert rc == 0
    data, pngs = _results(tmp / "cap")
    labels = [str(x) for x in data["labels"]]
    assert labels and " ".join(labels) == str(data["caption"])
    assert len(pngs) == len(labels) and data["maps"].shape == (1, len(labels), *shape)
    assert all(f"_{k}_" in p.name for k, p in enumerate(pngs))
    if not vqa:
        return
    rc = main(["vqa", str(picture), "--weights", str(folder), "--out", str(tmp / "vqa"),
               "--question", "what is the color ?", "--answers", "red,blue ball"])
    assert rc == 0
    data, pngs = _results(tmp / "vqa")
    labels = [str(x) for x in data["labels"]]
    assert labels[-2:] == ["red", "blue ball"] and len(labels) in (2, 3)
    assert len(pngs) == len(labels) and data["maps"].shape == (1, len(labels), *shape)
    assert str(data["question"]) == "what is the color ?"


def check_command_errors(folder: Path, other: str, tmp: Path, prompt: str, capsys) -> None:
    """Exit 2 with a message naming the problem: the folder given with another family's
    ``--model``, and a prompt the processor cannot place the image in."""
    from PIL import Image

    from mmexplain.cli import main

    picture = tmp / "photo.png"
    Image.fromarray(image()).save(picture)
    capsys.readouterr()
    base = ["caption", str(picture), "--weights", str(folder), "--out", str(tmp / "err")]
    assert main([*base, "--model", other]) == 2
    err = capsys.readouterr().err
    assert "--weights: expected a folder of a model" in err and repr(other) in err
    assert main([*base, "--prompt", prompt]) == 2
    assert "prompt: expected a prompt with the image token" in capsys.readouterr().err


def readme_commands(folders: dict) -> list[str]:
    """Every command of the README's Hugging Face table whose checkpoint folder is a key
    of ``folders`` (README name -> tiny folder), those names replaced by the folders."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Hugging Face vision-language models", 1)[1].split("\n## ", 1)[0]
    commands = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for command in re.findall(r"`(mmexplain [^`]+)`", cells[2] if len(cells) > 2 else ""):
            argv = shlex.split(command)
            weights = argv[argv.index("--weights") + 1] if "--weights" in argv else None
            if weights in folders:
                commands.append(command)
    return commands


def check_readme_commands(folders: dict, tmp: Path, capsys, count: int) -> None:
    """Each of the ``count`` README commands for ``folders`` runs on the tiny folders as
    written (the checkpoint name -> the folder, photo.jpg -> a picture): exit 0, a PNG
    per label of the .npz."""
    import shlex

    from PIL import Image

    from mmexplain.cli import main

    picture = tmp / "photo.png"
    Image.fromarray(image()).save(picture)
    commands = readme_commands(folders)
    assert len(commands) == count, commands
    for i, command in enumerate(commands):
        out = tmp / f"run{i}"
        argv = [str(folders.get(a, picture if a == "photo.jpg" else a))
                for a in shlex.split(command)[1:]]
        assert main([*argv, "--out", str(out), "--max-tokens", "3"] if argv[0] == "caption"
                    else [*argv, "--out", str(out)]) == 0, (command, capsys.readouterr().err)
        data, pngs = _results(out)
        assert len(pngs) == len(data["labels"]) == data["maps"].shape[1]


def check_eval_pointing(folder: Path, tmp: Path, capsys) -> None:
    """``mmexplain eval pointing --dataset coco ... --weights DIR`` on the shared COCO files
    (2 captions): exit 0, a pointing trial (hit 0 / 1) for each of the 3 present words."""
    import json

    from conftest import shared_file

    from mmexplain.cli import main

    instances = shared_file("coco", "instances.json")
    captions = shared_file("coco", "captions.json")
    rc = main(["eval", "pointing", "--dataset", "coco", "--images", str(instances.parent),
               "--instances", str(instances), "--captions", str(captions), "--limit", "2",
               "--method", "gradcam", "--weights", str(folder), "--no-progress",
               "--out", str(tmp)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp / "summary.json").read_text())
    assert summary["gradcam"]["hits"] + summary["gradcam"]["misses"] == 3  # man, man, elephant
    records = [json.loads(line) for p in sorted(tmp.glob("records.rank*.jsonl"))
               for line in p.read_text().splitlines()]
    hits = [e["hit"]["gradcam"] for r in records for e in r["entries"] if e["present"]]
    assert len(hits) == 3 and set(hits) <= {0, 1}
