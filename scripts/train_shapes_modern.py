"""Train the modern shapes-world models that ship inside the package as Hugging Face folders.

    python scripts/train_shapes_modern.py                  # both, into mmexplain/weights/
    python scripts/train_shapes_modern.py --only video --out /tmp/w

- ``shapes-vlm``: ``LlavaForConditionalGeneration`` -- a CLIP vision tower on the 64-px
  scenes (patch 8: an 8 x 8 grid of image tokens), LLaVA's two-layer projector and a small
  Llama, with a word-level tokenizer over the shapes vocabulary and a ``LlavaProcessor``
  that places the 64 image tokens after the prompt (:data:`CHAT`); it captions ("Describe
  the image.") and answers the shapes questions generatively from the prompt. It learns
  from one dialogue per scene and prompt (:class:`Dialogues`): first its vision tower
  alone (each token's look and whether it holds an object's centre), then, the tower
  frozen, the rest at a learning rate of 5e-4 (with :class:`GroundProbe`: the image tokens
  say which objects the question and its answer are about), then with explanation
  supervision.
- ``shapes-video``: ``VideoMAEForVideoClassification`` on the 16-frame clips (tubelets of
  4 frames x 8 x 8 pixels: a 4 x 8 x 8 token grid, mean pooling) classifying the actions,
  its tubelet filters initialised as temporal patterns (:func:`motion_filters`).

Both are trained with auxiliary dense signals (linear probes of each image token's
colour-shape look and object centre, and of the language model's image tokens' question
and answer objects; a probe of each video token's action where the actor is, background
elsewhere: none shipped) and with explanation supervision (GAIN, Li et al. 2018, as the
classic shapes models: the model's own Grad-CAM map at the explained layer pulled towards
the objects' masks with ``pointing_loss``). Deterministic (fixed seeds, fixed threads).
Trains on world seed 0 and reports accuracy on fresh scenes and clips of seed 1; the tests
use yet another seed. Each model trains in its own process (``--jobs 2``), one thread
each; the VLM's takes both cores after its vision phase (``--lm-threads``), by when the
video model is done: 18 min 32 s for the two on this 2-core CPU.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_shapes import (fit, look_maps, object_cover, pointing_loss,  # noqa: E402
                          reuse_memory)

from mmexplain.data import shapes as W  # noqa: E402
from mmexplain.distill import maps_at  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "mmexplain" / "weights"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PROMPT_WORDS = ("user", "assistant", ":", "describe", "the", "image", ".")
CAPTION_PROMPT = "Describe the image."
#: The chat template: the user's text first, then the image ("USER: what color is the
#: circle? <image> ASSISTANT:"), whatever the order of the message's parts. In a causal
#: language model the image tokens then read the question (as PaliGemma's prefix does):
#: each can tell whether it holds what is asked about. (Measured: about 60 % of the
#: answers right with either order after the same training; yes/no 68 % against 49 %.)
CHAT = ("{% for m in messages %}USER: "
        "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}"
        "{% endfor %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
        "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:"
        "{% endif %}")
SIZE, PATCH = 64, 8
VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=4, image_size=SIZE, patch_size=PATCH, projection_dim=64)
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128)
VIDEO = dict(image_size=SIZE, patch_size=8, num_frames=16, tubelet_size=4, hidden_size=64,
             num_hidden_layers=3, num_attention_heads=4, intermediate_size=192,
             use_mean_pooling=True)
#: Weight of the explanation supervision (GAIN's pointing loss) in each model's last phase.
EXPLAIN_WEIGHT = 1.0
#: The VLM's :class:`GroundProbe`: read after this many language-model layers (of 3), and
#: its weight in the loss (measured after 1,000 steps of phase 1: 68.4 % of the answers
#: right, against 60.9 % without it -- on a vision tower trained without the centre probe
#: on half the scenes; read after the first layer at weight 1: 53.9 %).
GROUND_LAYER, GROUND_WEIGHT = 2, 0.3


# --------------------------------------------------------------------------- the VLM's files


def vocabulary() -> list[str]:
    """The tokenizer's words: the specials, the prompt's words, every caption, question and
    answer word of the shapes world (ids in this order)."""
    words = (*SPECIALS, *PROMPT_WORDS, *W.CAPTION_VOCAB.itos[4:], *W.QUESTION_VOCAB.itos[4:],
             *W.ANSWERS)
    return list(dict.fromkeys(words))


def build_tokenizer() -> Any:
    """A word-level, lower-casing ``PreTrainedTokenizerFast`` over :func:`vocabulary`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   extra_special_tokens=["<image>"])


def build_processor(tokenizer: Any) -> Any:
    import transformers as tf

    images = tf.CLIPImageProcessor(size={"shortest_edge": SIZE},
                                   crop_size={"height": SIZE, "width": SIZE})
    return tf.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                             vision_feature_select_strategy="default", chat_template=CHAT,
                             num_additional_image_tokens=1)


def build_vlm(tokenizer: Any, seed: int) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    text = dict(model_type="llama", vocab_size=len(tokenizer), bos_token_id=ids["<s>"],
                eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], tie_word_embeddings=False,
                **TEXT)
    config = tf.LlavaConfig(vision_config={"model_type": "clip_vision_model", **VISION},
                            text_config=text, image_token_id=ids["<image>"],
                            vision_feature_layer=-1, vision_feature_select_strategy="default",
                            projector_hidden_act="gelu")
    model = tf.LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = ids["</s>"], ids["<pad>"], ids["<s>"]
    gen.max_new_tokens = W.MAX_CAPTION_LEN
    return model


# --------------------------------------------------------------------------- the VLM's data


class Dialogues:
    """The training dialogues: one per scene and prompt -- the caption prompt and each of
    the scene's questions, laid out by the processor as a user's would be (the prompt, then
    the 64 image tokens), followed by the reply (the caption or the answer) and the end
    token, which the model learns to say.

    ``ids`` (S, L) padded right; ``scene`` (S,) the scene of each dialogue; ``of_scene``
    (N, P) the dialogues of each scene (-1: none); ``weight`` (S, L) each reply token's
    weight in the loss (``answer_weight`` for an answer's word, 1 for the caption's words
    and the end tokens, 0 elsewhere); ``refs`` (S, L, M) bool the objects each reply token
    names (a caption's colour and shape words, an answer); ``asked`` / ``answered`` (S, M)
    bool the objects a question is about and those its answer is about (none for the
    caption prompt: ``question`` (S,) bool marks the questions).
    """

    def __init__(self, processor: Any, scenes: list[W.Scene], answer_weight: float = 1.0
                 ) -> None:
        tok = processor.tokenizer
        self.pad, self.eos = tok.pad_token_id, tok.eos_token_id
        laid: dict[str, list[int]] = {}
        rows: list[tuple[int, list[int], list[tuple[int, ...]], float]] = []
        about: list[tuple[tuple[int, ...], tuple[int, ...]] | None] = []
        for s, scene in enumerate(scenes):
            turns = [(CAPTION_PROMPT, list(scene.caption.tokens), list(scene.caption.refs),
                      1.0)]
            turns += [(qa.question, [qa.answer], [qa.answer_refs], answer_weight)
                      for qa in scene.qas]
            about += [None, *((qa.question_refs, qa.answer_refs) for qa in scene.qas)]
            for prompt, words, refs, weight in turns:
                if prompt not in laid:
                    laid[prompt] = prompt_ids(processor, prompt)
                reply = tok(" ".join(words), add_special_tokens=False)["input_ids"]
                if len(reply) != len(words):  # word-level: one token a word
                    raise ValueError(f"the tokenizer split {words}")
                rows.append((s, laid[prompt] + reply + [self.eos], [*refs, ()], weight))
        count, length = len(rows), max(len(ids) for _, ids, _, _ in rows)
        self.ids = torch.full((count, length), self.pad, dtype=torch.long)
        self.scene = torch.tensor([s for s, _, _, _ in rows])
        self.weight = torch.zeros((count, length))
        self.refs = torch.zeros((count, length, W.MAX_OBJECTS), dtype=torch.bool)
        self.asked = torch.zeros((count, W.MAX_OBJECTS), dtype=torch.bool)
        self.answered = torch.zeros_like(self.asked)
        self.question = torch.tensor([a is not None for a in about])
        for d, objects in enumerate(about):
            if objects is not None:
                self.asked[d, list(objects[0])] = True
                self.answered[d, list(objects[1])] = True
        per_scene = torch.bincount(self.scene, minlength=len(scenes))
        self.of_scene = torch.full((len(scenes), int(per_scene.max())), -1, dtype=torch.long)
        filled = [0] * len(scenes)
        for d, (s, ids, refs, weight) in enumerate(rows):
            self.ids[d, :len(ids)] = torch.tensor(ids)
            first = len(ids) - len(refs)  # the reply's first token
            self.weight[d, first:len(ids)] = weight
            self.weight[d, len(ids) - 1] = 1.0  # the end token
            for j, objects in enumerate(refs):
                self.refs[d, first + j, list(objects)] = True
            self.of_scene[s, filled[s]] = d
            filled[s] += 1

    def __len__(self) -> int:
        return len(self.ids)


def prompt_ids(processor: Any, prompt: str) -> list[int]:
    """The token ids of ``prompt`` as the processor lays it out for one 64-px image."""
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True)
    out = processor(images=np.zeros((SIZE, SIZE, 3), np.uint8), text=text, return_tensors="pt")
    return out["input_ids"][0].tolist()


def normalise(images: torch.Tensor, processor: Any) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> pixel values as the CLIP image processor makes them."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    return (images.float() * float(ip.rescale_factor) - mean) / std


def vlm_logits(model: nn.Module, pixels: torch.Tensor, ids: torch.Tensor,
               attn: torch.Tensor, rows: torch.Tensor | None = None, layer: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logits (S, L, V), the vision tokens the projector reads (B, N, C), the projector's
    output as a grid per text (S, D, 8, 8): the explained layer, in the graph; with
    ``layer``, the language model's hidden states after that many layers at the image
    tokens (S, N, D), else None) -- the model's own forward with its image features placed
    at the image tokens. ``pixels`` (B, 3, H, W); ``ids`` (S, L) the texts, text s reading
    image ``rows[s]`` (default: text s the image s)."""
    inner = model.model
    vision = inner.vision_tower(pixel_values=pixels, output_hidden_states=True)
    hidden = vision.hidden_states[model.config.vision_feature_layer][:, 1:]  # CLS dropped
    feats = inner.multi_modal_projector(hidden)  # (B, N, D)
    side = SIZE // PATCH
    grid = feats.transpose(1, 2).reshape(feats.shape[0], -1, side, side)
    if rows is not None:
        grid = grid[rows]  # one copy per text: each text's own map
    tokens = grid.flatten(2).transpose(1, 2)
    embeds = inner.get_input_embeddings()(ids)
    where = (ids == model.config.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(where, tokens.reshape(-1).to(embeds.dtype))
    out = model(inputs_embeds=embeds, attention_mask=attn, use_cache=False,
                output_hidden_states=layer is not None)
    at = None
    if layer is not None:
        at = out.hidden_states[layer][where[..., 0]].view(len(ids), -1, embeds.shape[-1])
    return out.logits, hidden, grid, at


class LookProbe(nn.Module):
    """Auxiliary dense signals (not shipped), read linearly from the vision tokens the
    projector reads: each image token's colour-shape look (or the background), and whether
    it holds an object's centre (:func:`centre_cells`; with ``centre_weight`` > 0). The
    looks teach the tower to see; the centres give each object one token of its own, which
    the language model can count ("how many circles are there?") where it cannot count the
    two to six tokens of an object of any size."""

    def __init__(self, channels: int, centre_weight: float = 0.0) -> None:
        super().__init__()
        self.head = nn.Linear(channels, 1 + len(W.COLORS) * len(W.SHAPES))
        self.centre = nn.Linear(channels, 1)
        self.centre_weight = centre_weight

    def loss(self, hidden: torch.Tensor, looks: torch.Tensor,
             centres: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, N, C); looks (B, N) long; centres (B, N) float 0/1 or None."""
        loss = nn.functional.cross_entropy(self.head(hidden).flatten(0, 1), looks.flatten())
        if centres is not None and self.centre_weight > 0:
            loss = loss + self.centre_weight * nn.functional.binary_cross_entropy_with_logits(
                self.centre(hidden)[..., 0], centres)
        return loss


def centre_cells(masks: torch.Tensor, side: int) -> torch.Tensor:
    """masks (B, M, H, W) bool -> (B, side * side) float: 1 at the cell (row-major) holding
    each object's centre of mass, 0 elsewhere (empty slots mark none)."""
    m = masks.float()
    area = m.sum((2, 3))
    rows = (m.sum(3) * torch.arange(m.shape[2], dtype=m.dtype)).sum(2) / area.clamp(min=1)
    cols = (m.sum(2) * torch.arange(m.shape[3], dtype=m.dtype)).sum(2) / area.clamp(min=1)
    cell = ((rows * side / m.shape[2]).long().clamp(max=side - 1) * side
            + (cols * side / m.shape[3]).long().clamp(max=side - 1))
    out = torch.zeros(len(m), side * side)
    return out.scatter_reduce_(1, cell, (area > 0).float(), reduce="amax")


class GroundProbe(nn.Module):
    """Auxiliary dense signal of the language model (not shipped): at each image token,
    after :data:`GROUND_LAYER` of its layers, whether the objects a question is about cover
    it, and whether the objects its answer is about do (binary cross-entropy against the
    share of the cell each covers). The image tokens follow the question (:data:`CHAT`), so
    they can tell; trained on the answers alone, the language model did not learn to bind
    a question's words to the image tokens they name (65 % of the answers)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.asked, self.answered = nn.Linear(channels, 1), nn.Linear(channels, 1)

    def loss(self, hidden: torch.Tensor, asked: torch.Tensor, answered: torch.Tensor
             ) -> torch.Tensor:
        """hidden (S, N, D) at the image tokens; asked / answered (S, N) covers in [0, 1]."""
        bce = nn.functional.binary_cross_entropy_with_logits
        return (bce(self.asked(hidden)[..., 0], asked)
                + bce(self.answered(hidden)[..., 0], answered))


def vlm_loss(model: nn.Module, probe: LookProbe, processor: Any, scenes: W.SceneBatch,
             looks: torch.Tensor, talks: Dialogues, idx: torch.Tensor, explain: bool,
             ground: GroundProbe | None = None, gen: torch.Generator | None = None
             ) -> torch.Tensor:
    """Next-token loss on the replies of the scenes ``idx``'s dialogues + the look probe
    (+ with ``ground``, GROUND_WEIGHT times its loss on the questions; + with ``explain``,
    the pointing loss of the Grad-CAM map of one object-naming token of each dialogue that
    names one, drawn at random with ``gen``: one term for the captions and one for the
    answers, so that the captions' words weigh as much as all the answers)."""
    picked = talks.of_scene[idx]  # (B, P)
    rows = torch.arange(len(idx)).repeat_interleave((picked >= 0).sum(1))
    which = picked[picked >= 0]  # the dialogues, scene by scene
    length = int((talks.ids[which] != talks.pad).sum(1).max())
    ids = talks.ids[which, :length]
    attn = (ids != talks.pad).long()
    logits, hidden, grid, at = vlm_logits(model, normalise(scenes.images[idx], processor),
                                          ids, attn, rows, GROUND_LAYER if ground else None)
    logp = logits[:, :-1].float().log_softmax(-1).gather(2, ids[:, 1:, None])[..., 0]
    scored = talks.weight[which, 1:length]
    loss = -(logp * scored).sum() / scored.sum()
    loss = loss + probe.loss(hidden, looks[idx].flatten(1))
    if ground is None and not explain:
        return loss
    masks, cells = scenes.masks[idx][rows], (SIZE // PATCH,) * 2  # each dialogue's scene
    if ground is not None and bool(talks.question[which].any()):
        q = talks.question[which]
        loss = loss + GROUND_WEIGHT * ground.loss(
            at[q], object_cover(masks[q], talks.asked[which][q], cells).flatten(1),
            object_cover(masks[q], talks.answered[which][q], cells).flatten(1))
    if not explain:
        return loss
    refs = talks.refs[which, 1:length]  # (S, L-1, M): the objects each predicted token names
    pick, keep = explained_tokens(refs, gen)
    score = logp.gather(1, pick)[:, 0]
    named = refs.gather(1, pick[:, :, None].expand(-1, -1, refs.shape[2]))[:, 0]
    maps = maps_at(grid, score)  # (S, 8, 8) Grad-CAM, differentiable
    cover = object_cover(masks, named, cells)
    for part in (keep & ~talks.question[which], keep & talks.question[which]):
        if bool(part.any()):  # the captions' words weigh as much as all the answers
            loss = loss + EXPLAIN_WEIGHT * pointing_loss(maps[part], cover[part])
    return loss


def explained_tokens(refs: torch.Tensor, gen: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """refs (S, L, M) bool, the objects each token names -> (the position of one token of
    each text that names an object, drawn uniformly among them (S, 1); which texts have
    one (S,) bool: the others' positions are drawn among all theirs, to be left out)."""
    visual = refs.any(2)
    keep = visual.any(1)
    return torch.multinomial(visual.float() + ~keep[:, None], 1, generator=gen), keep


def save_vlm(model: nn.Module, processor: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def vision_loss(model: nn.Module, probe: LookProbe, processor: Any, scenes: W.SceneBatch,
                looks: torch.Tensor, centres: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The look and centre probes on the vision tokens the projector reads (the vision
    tower alone)."""
    vision = model.model.vision_tower(pixel_values=normalise(scenes.images[idx], processor),
                                      output_hidden_states=True)
    hidden = vision.hidden_states[model.config.vision_feature_layer][:, 1:]
    return probe.loss(hidden, looks[idx].flatten(1), centres[idx])


def train_vlm(out: Path, images: int, steps: int, explain_steps: int, seed: int,
              batch: int, vision_steps: int = 0, lr: float = 5e-4,
              answer_weight: float = 1.0, freeze_vision: bool = False,
              vision_images: int = 0, centre_weight: float = 0.0,
              lm_threads: int | None = None, ground: bool = True) -> None:
    """Phase 0: the vision tower and its probes alone (:func:`vision_loss`) on
    ``max(images, vision_images)`` scenes (cheap: no language model). Phase 1: the model
    (the vision tower frozen with ``freeze_vision``) on the next-token loss of captions and
    answers at ``lr``, on the first ``images`` scenes, with ``lm_threads`` threads (the
    video model trains beside phase 0 and is done by then), and with ``ground`` the
    :class:`GroundProbe`. Phase 2: the same plus explanation supervision
    (:func:`vlm_loss`)."""
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_vlm(tokenizer, seed)
    probe = LookProbe(VISION["hidden_size"], centre_weight)
    start = time.time()
    world = W.ShapesWorld(seed=seed)
    listed = world.images(max(images, vision_images))
    scenes = W.collate_scenes(listed, dtype=torch.uint8)  # the rest reads the first images
    side = SIZE // PATCH
    looks, centres = look_maps(scenes, side), centre_cells(scenes.masks, side)
    talks = Dialogues(processor, listed[:images], answer_weight)
    print(f"vlm: {len(scenes)} scenes for the vision tower, {images} for the rest: "
          f"{len(talks)} dialogues of {talks.ids.shape[1]} tokens at most "
          f"({time.time() - start:.0f} s); "
          f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    grounding = GroundProbe(TEXT["hidden_size"]) if ground else None
    both = nn.ModuleList([model, probe, *([grounding] if grounding else [])])
    if vision_steps > 0:  # phase 0: the vision tower learns the looks first (no LM: cheap)
        vision = nn.ModuleList([model.model.vision_tower, probe])
        fit(vision, lambda idx: vision_loss(model, probe, processor, scenes, looks, centres,
                                            idx),
            len(scenes), steps=vision_steps, batch=64, lr=2e-3, seed=seed + 7,
            name="vlm vision", clip=1.0)
    if freeze_vision:  # as LLaVA's second stage: the vision tower as phase 0 left it
        model.model.vision_tower.requires_grad_(False)
    if lm_threads:
        torch.set_num_threads(lm_threads)
    params = [p for p in both.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed + 5)  # the explained token of each dialogue
    for phase, count, rate in (("vlm", steps, lr), ("vlm explained", explain_steps, 5e-4)):
        if count > 0:
            # the pointing loss differentiates a gradient: eager attention (SDPA on CPUs has
            # no double backward); the same arithmetic
            model.set_attn_implementation("eager" if phase != "vlm" else "sdpa")
            fit(both, lambda idx: vlm_loss(model, probe, processor, scenes, looks, talks, idx,
                                           phase != "vlm", grounding, gen),
                images, steps=count, batch=batch, lr=rate, seed=seed + len(phase),
                name=phase, clip=1.0, params=params)
    model.set_attn_implementation("sdpa")
    save_vlm(model, processor, out / "shapes-vlm")
    report_vlm(out / "shapes-vlm", seed + 1)


@torch.no_grad()
def report_vlm(folder: Path, seed: int, images: int = 300) -> dict[str, float]:
    """Caption and VQA accuracy of the saved folder, loaded as a user's checkpoint."""
    from mmexplain.adapters import get_adapter
    from mmexplain.tasks.shapes import generated_answers, vlm_caption_accuracy, vlm_vqa_accuracy

    adapter = get_adapter("llava", path=folder)
    batch = W.ShapesWorld(seed=seed).image_batch(images, dtype=torch.uint8)
    answers = generated_answers(adapter, batch)
    found = {"caption": vlm_caption_accuracy(adapter, batch),
             "vqa": vlm_vqa_accuracy(adapter, batch, answers)}
    right = [a.strip() == W.ANSWERS[int(t)] for a, t in zip(answers, batch.answers)]
    kinds = ", ".join(
        f"{kind} {np.mean([r for r, k in zip(right, batch.question_kinds) if k == i]):.0%}"
        for i, kind in enumerate(W.QUESTION_KINDS))
    print(f"vlm: visual words correct {found['caption']:.1%}, answers {found['vqa']:.1%} "
          f"({kinds}) on {images} fresh scenes -> {folder}", flush=True)
    return found


# --------------------------------------------------------------------------- the video model


def build_video(seed: int) -> tuple[nn.Module, Any]:
    import transformers as tf

    torch.manual_seed(seed)
    labels = {"id2label": dict(enumerate(W.ACTIONS)),
              "label2id": {a: i for i, a in enumerate(W.ACTIONS)}}
    model = tf.VideoMAEForVideoClassification(tf.VideoMAEConfig(**VIDEO, **labels))
    motion_filters(model.videomae.embeddings.patch_embeddings.projection)
    processor = tf.VideoMAEImageProcessor(size={"shortest_edge": SIZE},
                                          crop_size={"height": SIZE, "width": SIZE})
    return model, processor


@torch.no_grad()
def motion_filters(conv: nn.Conv3d) -> None:
    """Initialise the tubelet embedding's filters as temporal patterns: each a random
    spatial filter times a linear ramp over the tubelet's frames (half of them: motion in
    one direction) or a "V" (the others: there and back, as a bounce), both summing to zero
    over time -- a still background and the still distractors embed to the bias alone, a
    moving actor does not. A ViT trained from scratch on a few thousand clips does not find
    motion by itself (its loss stayed at chance for 300 steps); only the initial weights
    change, the architecture is VideoMAE's."""
    out, _, frames = conv.weight.shape[:3]
    t = torch.linspace(-1.0, 1.0, frames)
    patterns = [t / t.norm(), (t.abs() - t.abs().mean()) / (t.abs() - t.abs().mean()).norm()]
    spatial = conv.weight.mean(dim=2, keepdim=True) * frames ** 0.5  # (out, 3, 1, p, p)
    for k, pattern in enumerate(patterns):
        rows = slice(k * out // 2, (k + 1) * out // 2)
        conv.weight[rows] = spatial[rows] * pattern.view(1, 1, frames, 1, 1)


def video_logits(model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K), the last layer's tokens as a grid (B, C, t', h', w'): the explained
    layer, in the graph) -- VideoMAE's forward: the encoder, mean pooling, fc_norm, the
    classifier. ``pixels`` (B, T, 3, H, W) normalised."""
    tokens = model.videomae(pixel_values=pixels).last_hidden_state  # (B, N, C), time-major
    t = VIDEO["num_frames"] // VIDEO["tubelet_size"]
    side = SIZE // VIDEO["patch_size"]
    grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, t, side, side)
    pooled = grid.flatten(2).mean(2)
    return model.classifier(model.fc_norm(pooled)), grid


class ActionProbe(nn.Module):
    """Auxiliary dense signal (not shipped): each video token's action where the actor is,
    "background" elsewhere, read linearly from the explained layer's tokens."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.head = nn.Conv3d(channels, 1 + len(W.ACTIONS), 1)

    def loss(self, grid: torch.Tensor, cover: torch.Tensor, actions: torch.Tensor
             ) -> torch.Tensor:
        labels = torch.where(cover >= 0.3, 1 + actions[:, None, None, None], 0)
        return nn.functional.cross_entropy(self.head(grid), labels)


def video_loss(model: nn.Module, probe: ActionProbe, mean_std: tuple[torch.Tensor, ...],
               data: W.ClipBatch, idx: torch.Tensor, explain: bool, gen: torch.Generator
               ) -> torch.Tensor:
    """Cross-entropy of the augmented clips + the action probe (+ with ``explain``, the
    per-frame pointing loss of the true action's Grad-CAM map against the actor)."""
    from train_shapes import augment_clips

    both = torch.cat([data.videos[idx], data.actor_masks[idx, None].to(torch.uint8)], 1)
    both, actions = augment_clips(both, data.actions[idx], gen)
    mean, std = mean_std
    pixels = ((both[:, :3].float() / 255 - mean) / std).transpose(1, 2)  # (B, T, 3, H, W)
    logits, grid = video_logits(model, pixels)
    _running_accuracy(float((logits.argmax(1) == actions).float().mean()))
    cover = nn.functional.adaptive_avg_pool3d(both[:, 3].float()[:, None], grid.shape[2:])[:, 0]
    loss = nn.functional.cross_entropy(logits, actions) + probe.loss(grid, cover, actions)
    if explain:
        maps = maps_at(grid, logits.gather(1, actions[:, None])[:, 0])  # (B, t', h', w')
        loss = loss + EXPLAIN_WEIGHT * pointing_loss(maps, cover)  # per time slice
    return loss


_ACCURACY: list[float] = []


def _running_accuracy(value: float, every: int = 50) -> None:
    """Print the training batches' accuracy, averaged over the last ``every`` steps."""
    _ACCURACY.append(value)
    if len(_ACCURACY) % every == 0:
        print(f"  video: batches' accuracy {np.mean(_ACCURACY[-every:]):.1%} over steps "
              f"{len(_ACCURACY) - every + 1}-{len(_ACCURACY)}", flush=True)


def train_video(out: Path, clips: int, steps: int, explain_steps: int, seed: int,
                batch: int) -> None:
    """Phase 1: the classifier and the action probe; phase 2: plus explanation supervision."""
    model, processor = build_video(seed)
    probe = ActionProbe(VIDEO["hidden_size"])
    data = W.ShapesWorld(seed=seed).clip_batch(clips, dtype=torch.uint8)
    mean_std = tuple(torch.tensor(v).view(1, 3, 1, 1, 1) for v in (processor.image_mean,
                                                                   processor.image_std))
    print(f"video: {clips} clips; {sum(p.numel() for p in model.parameters()):,} parameters",
          flush=True)
    gen = torch.Generator().manual_seed(seed + 2)
    both = nn.ModuleList([model, probe])
    for phase, count, lr in (("video", steps, 3e-3), ("video explained", explain_steps, 5e-4)):
        if count > 0:
            model.set_attn_implementation("eager" if phase != "video" else "sdpa")
            fit(both, lambda idx: video_loss(model, probe, mean_std, data, idx,
                                             phase != "video", gen),
                clips, steps=count, batch=batch, lr=lr, seed=seed + len(phase), name=phase,
                clip=1.0)
    model.set_attn_implementation("sdpa")
    folder = out / "shapes-video"
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    report_video(folder, seed + 1)


@torch.no_grad()
def report_video(folder: Path, seed: int, clips: int = 300) -> float:
    from mmexplain.adapters import get_adapter
    from mmexplain.tasks.shapes import video_action_accuracy

    adapter = get_adapter("videomae", path=folder)
    acc = video_action_accuracy(adapter, W.ShapesWorld(seed=seed).clip_batch(clips))
    print(f"video: actions recognised {acc:.1%} on {clips} fresh clips -> {folder}", flush=True)
    return acc


# --------------------------------------------------------------------------- main


def times() -> str:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    peak = max(u.ru_maxrss for u in usage) / 1024
    return f"CPU {cpu:.0f} s, peak memory of one process {peak:.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--only", choices=["vlm", "video"], action="append")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--vlm-vision-steps", type=int, default=2400, help="steps of 64 "
                        "scenes training the vision tower alone on the looks first")
    parser.add_argument("--vlm-vision-images", type=int, default=20000, help="scenes of the "
                        "vision tower's phase (the first --images of them serve the rest)")
    parser.add_argument("--centre-weight", type=float, default=1.0, help="weight of the "
                        "vision tower's object-centre probe (0: none)")
    parser.add_argument("--no-ground", action="store_true", help="train the VLM without "
                        "its GroundProbe")
    parser.add_argument("--lm-threads", type=int, default=2, help="threads of the VLM's "
                        "process after its vision phase (the video model is done by then)")
    parser.add_argument("--vlm-steps", type=int, default=2400)
    parser.add_argument("--vlm-explain-steps", type=int, default=400)
    parser.add_argument("--vlm-batch", type=int, default=8, help="scenes per step (each with "
                        "its caption's and its questions' dialogues, about 7)")
    parser.add_argument("--vlm-lr", type=float, default=5e-4, help="the VLM's learning rate "
                        "before explanation supervision (2e-3 let its language model learn "
                        "the captions' grammar but barely read the image tokens)")
    parser.add_argument("--train-vision", action="store_true", help="train the vision tower "
                        "with the rest after its own phase (default: frozen then, as in "
                        "LLaVA's second stage)")
    parser.add_argument("--text-layers", type=int, default=TEXT["num_hidden_layers"],
                        help="layers of the VLM's language model")
    parser.add_argument("--answer-weight", type=float, default=1.0, help="weight of an "
                        "answer's word in the VLM's next-token loss (a caption's words: 1)")
    parser.add_argument("--clips", type=int, default=4000)
    parser.add_argument("--video-steps", type=int, default=1200)
    parser.add_argument("--video-explain-steps", type=int, default=100)
    parser.add_argument("--video-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="threads of the VLM's process")
    parser.add_argument("--video-threads", type=int, default=1, help="threads of the video "
                        "model's process")
    parser.add_argument("--jobs", type=int, default=2, help="2: each model in its own process")
    args = parser.parse_args()
    reuse_memory()
    TEXT["num_hidden_layers"] = args.text_layers
    only_video = (args.only or []) == ["video"]
    torch.set_num_threads(args.video_threads if only_video else args.threads)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = args.only or ["vlm", "video"]
    start = time.time()
    if args.jobs > 1 and len(todo) > 1:
        base = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out),
                "--jobs", "1"]
        for k, v in vars(args).items():  # every setting spelled out; flags only when set
            if k not in ("out", "only", "jobs") and v is not False:
                base.append(f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}"))
        children = [subprocess.Popen(base + ["--only", name]) for name in todo]
        failed = [name for name, child in zip(todo, children) if child.wait() != 0]
        if failed:
            raise SystemExit(f"training failed for: {', '.join(failed)}")
    else:
        if "vlm" in todo:
            train_vlm(args.out, args.images, args.vlm_steps, args.vlm_explain_steps, args.seed,
                      args.vlm_batch, args.vlm_vision_steps, args.vlm_lr, args.answer_weight,
                      not args.train_vision, args.vlm_vision_images, args.centre_weight,
                      args.lm_threads, not args.no_ground)
        if "video" in todo:
            train_video(args.out, args.clips, args.video_steps, args.video_explain_steps,
                        args.seed, args.video_batch)
    print(f"done in {time.time() - start:.0f} s wall; {times()}", flush=True)


if __name__ == "__main__":
    main()
