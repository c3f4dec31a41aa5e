"""``mmexplain demo``: the main job on the embedded default, with no downloads.

Explains the three shapes-world models shipped in the package on freshly
generated scenes and clips (world seed ``--seed``, never seen in training):

- the captioner: one map per visual word (colour and shape words) of the
  ground-truth caption, all words from one backward;
- the VQA model: maps for its own answer and for a forced alternative answer;
- the C3D: spatiotemporal maps of the true action.

Grad-CAM and Grad-CAM++ side by side, measured against the world's exact
masks with the papers' protocols (pointing game, rank correlation with the
masks as "human attention", DenseCap-style inside/outside box ratio, Average
Drop / % Increase in Confidence / Win %, instance coverage), written to one
self-contained HTML report and a JSON of the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmexplain import metrics
from mmexplain.tasks import protocols as P
from mmexplain.engine import make_cam, resize_grid
from mmexplain.errors import bad_value
from mmexplain.methods import chosen_methods, get_method, list_methods

HELP = "explain the shipped shapes-world models and write an HTML report with measured figures"
#: Drawn at 2x: the world's 64-px images are small on screen.
SCALE = 2
#: Pointing tolerance in pixels: the paper's 15 px at 224 px, scaled to the 64 px world.
TOLERANCE = P.SHAPES_TOLERANCE
#: A map "covers" an instance when its peak inside the instance reaches this share of its max.
COVER = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="mmexplain-out/demo", help="output folder")
    parser.add_argument("--method", default="all",
                        help="which registered method(s) to run, side by side: one name, a "
                        "comma-separated list, 'both' (gradcam,gradcam++) or 'all' (default: "
                        "all: " + ", ".join(list_methods()) + ")")
    parser.add_argument("--images", type=int, default=40, help="scenes to explain")
    parser.add_argument("--clips", type=int, default=12, help="clips to explain")
    parser.add_argument("--seed", type=int, default=2026, help="world seed of the evaluation set")
    parser.add_argument("--show", type=int, default=6, help="examples drawn in the report")


@dataclass
class Tally:
    """Per-method lists of per-item values, summarised at the end."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, method: str, key: str, value: float | list[float]) -> None:
        bucket = self.values.setdefault(method, {}).setdefault(key, [])
        bucket.extend(value if isinstance(value, list) else [value])

    def get(self, method: str, key: str) -> list[float]:
        return self.values.get(method, {}).get(key, [])


def _big(pixels: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) or a clip (3, T, H, W) enlarged SCALE times for the report."""
    if pixels.dim() == 4:
        return F.interpolate(pixels, scale_factor=SCALE, mode="nearest")
    return F.interpolate(pixels[None], scale_factor=(1, SCALE, SCALE), mode="nearest")[0]


def _covered(map_: torch.Tensor, masks: torch.Tensor) -> int:
    """How many instance masks (n, H, W) hold a point >= COVER of the map's max."""
    peak = map_.max()
    if peak <= 0:
        return 0
    return int(sum(bool((map_[m] >= COVER * peak).any()) for m in masks))


@dataclass
class Demo:
    """What every section of the demo shares: the world's data, the models, the explainers
    of every method, the report being written and the per-method tally."""

    args: argparse.Namespace
    methods: list[str]
    out: Path
    world: Any
    scenes: Any
    clips: Any
    models: dict[str, Any]
    cams: dict[str, dict[str, Any]]
    report: Any
    tally: Tally = field(default_factory=Tally)

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(self.scenes.images.shape[-2:])

    def short(self, method: str) -> str:
        return get_method(method).short


def run(args: argparse.Namespace) -> int:
    for arg in ("images", "clips", "show"):
        if getattr(args, arg) < (1 if arg != "show" else 0):
            raise bad_value(f"--{arg}", "a positive number", getattr(args, arg))
    start = time.time()
    demo = _setup(args)
    checks = _model_checks(demo)
    _caption_section(demo)
    print("regions and faithfulness ...", flush=True)
    records = demo.world.images(len(demo.scenes))
    regions = [e for scene in records
               for e in P.shapes_regions(demo.models["cap"], scene, methods=demo.methods)]
    faithful = {"vqa": [e for scene in records for e in
                        P.shapes_faithfulness(demo.models["vqa"], scene, methods=demo.methods)],
                "clip": [e for clip in demo.world.clips(len(demo.clips)) for e in
                         P.clip_faithfulness(demo.models["c3d"], clip, methods=demo.methods)]}
    _vqa_section(demo)
    _video_section(demo)
    figures = _figures(demo, checks, regions, faithful)
    figures["seconds"] = round(time.time() - start, 1)
    _write(demo, figures, checks)
    return 0


def _setup(args: argparse.Namespace) -> Demo:
    from mmexplain.adapters import get_adapter
    from mmexplain.data import shapes as W
    from mmexplain.render import Report

    methods = chosen_methods(args.method)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = W.ShapesWorld(seed=args.seed)
    models = {"cap": get_adapter("shapes-captioner"), "vqa": get_adapter("shapes-vqa"),
              "c3d": get_adapter("shapes-c3d")}
    cams = {m: {kind: make_cam(model, m) for kind, model in models.items()} for m in methods}
    report = Report("mmexplain demo: what the shapes-world models look at")
    return Demo(args, methods, out, world, world.image_batch(args.images),
                world.clip_batch(args.clips), models, cams, report)


def _model_checks(demo: Demo) -> dict[str, float]:
    from mmexplain.tasks.shapes import action_accuracy, caption_accuracy, vqa_accuracy

    scenes, clips = demo.scenes, demo.clips
    checks = {
        "caption_visual_words_correct": caption_accuracy(demo.models["cap"].model, scenes),
        "vqa_accuracy": vqa_accuracy(demo.models["vqa"].model, scenes),
        "action_accuracy": action_accuracy(demo.models["c3d"].model, clips),
    }
    print(f"models: caption visual words {checks['caption_visual_words_correct']:.0%} correct, "
          f"VQA {checks['vqa_accuracy']:.0%} accurate, actions "
          f"{checks['action_accuracy']:.0%} recognised ({len(scenes)} scenes, {len(clips)} clips)")
    demo.report.text(
        f"{len(scenes)} generated scenes and {len(clips)} clips (world seed "
        f"{demo.args.seed}, never seen in training), explained with "
        + ", ".join(get_method(m).label for m in demo.methods) + ". Maps are measured against "
        f"the exact object masks; pointing tolerance {TOLERANCE} px (the paper's 15 px at 224 "
        "px, scaled to 64 px). The three models were trained with explanation supervision "
        "(GAIN, Li et al. 2018: their Grad-CAM maps pulled towards the objects' masks), so "
        "their evidence is known to lie on the objects; the other methods were never "
        "trained for.")
    return checks


def _caption_section(demo: Demo) -> None:
    """One map per visual word of each scene's caption (Grad-CAM paper, sec. 8.1.1)."""
    from mmexplain.render import overlay, tile, to_uint8_image
    from mmexplain.tasks.caption import WordLogProbs

    print(f"captions: per-word maps of {len(demo.scenes)} scenes ...", flush=True)
    demo.report.section("Captioning: one map per visual word (Grad-CAM paper, sec. 8.1.1)")
    scenes, cap, shown = demo.scenes, demo.models["cap"], 0
    for i in range(len(scenes)):
        image = scenes.images[i:i + 1]
        tokens = scenes.captions[i:i + 1, 1:]  # words then <end>
        refs = scenes.caption_refs[i, 1:]  # (T, M) objects named by each token
        positions = [t for t in range(refs.shape[0]) if bool(refs[t].any())]
        if not positions:
            continue
        word_masks = torch.stack([scenes.masks[i][refs[t]].any(0) for t in positions])  # (K,H,W)
        words = cap.vocab.words(tokens[0, positions].tolist())
        panels, labels, big = [], [], _big(image)
        for m in demo.methods:
            expl = demo.cams[m]["cap"](image, target=WordLogProbs(positions), tokens=tokens)
            maps = P.evidence(resize_grid(expl.maps, demo.size)[0])  # (K, H, W)
            _tally_words(demo, m, maps, word_masks, [scenes.masks[i][refs[t]] for t in positions])
            if shown < demo.args.show:
                panels += [to_uint8_image(big[0])] + [overlay(big[0], maps[k])
                                                      for k in range(len(positions))]
                labels += [demo.short(m)] + [f"{demo.short(m)}: {w}" for w in words]
        if shown < demo.args.show:
            caption = " ".join(cap.vocab.words(tokens[0].tolist())).replace(" <end>", "")
            generated = cap.captions(image).texts[0]
            demo.report.image(tile(panels, ncols=len(positions) + 1, labels=labels),
                              caption=f"caption: “{caption}” — the model says: “{generated}”")
            shown += 1


def _tally_words(demo: Demo, m: str, maps: torch.Tensor, word_masks: torch.Tensor,
                 instances: list[torch.Tensor]) -> None:
    """Pointing and rank correlation per word; coverage of the words naming several objects."""
    hits = metrics.pointing_game(maps, word_masks, tolerance=TOLERANCE)
    demo.tally.add(m, "word_pointing", hits.float().tolist())
    demo.tally.add(m, "word_rank_correlation",
                   metrics.rank_correlation(maps, word_masks.float()).tolist())
    for k, inst in enumerate(instances):  # several instances named by one word
        if inst.shape[0] > 1:
            demo.tally.add(m, "instances_covered", _covered(maps[k], inst) / inst.shape[0])


def _vqa_section(demo: Demo) -> None:
    """The model's answer and a forced alternative (sec. 8.2)."""
    from mmexplain.data import shapes as W
    from mmexplain.render import overlay, tile, to_uint8_image
    from mmexplain.tasks.vqa import AnswerScore

    print(f"VQA: maps of {len(demo.scenes.questions)} answers and forced answers ...", flush=True)
    demo.report.section("VQA: the model's answer and a forced alternative (sec. 8.2)")
    scenes, vqa, shown = demo.scenes, demo.models["vqa"], 0
    for q in range(len(scenes.questions)):
        i = int(scenes.question_image[q])
        image = scenes.images[i:i + 1]
        ctx = {"question": scenes.questions[q:q + 1],
               "question_lengths": scenes.question_lengths[q:q + 1]}
        with torch.no_grad():
            given = int(vqa.model(image, **ctx).argmax(1))
        truth = int(scenes.answers[q])
        alt = _alternative(truth, given, W)
        objects = scenes.answer_objects[q, : int(scenes.num_objects[i])]
        mask = scenes.masks[i, : objects.shape[0]][objects].any(0) if objects.any() else None
        panels, labels, big = [], [], _big(image)
        for m in demo.methods:
            expl = demo.cams[m]["vqa"](image, target=AnswerScore([given, alt]), **ctx)
            maps = P.evidence(resize_grid(expl.maps, demo.size)[0])  # (2, H, W)
            if mask is not None and given == truth:
                demo.tally.add(m, "vqa_pointing",
                               float(metrics.pointing_game(maps[0], mask, tolerance=TOLERANCE)))
                demo.tally.add(m, "vqa_rank_correlation",
                               float(metrics.rank_correlation(maps[0], P.blurred(mask))))
            if shown < demo.args.show and mask is not None:
                panels += [overlay(big[0], maps[0]), overlay(big[0], maps[1])]
                labels += [f"{demo.short(m)}: {W.ANSWERS[given]}",
                           f"{demo.short(m)}: {W.ANSWERS[alt]}?"]
        if shown < demo.args.show and panels:
            question = " ".join(vqa.question_vocab.words(
                scenes.questions[q, : int(scenes.question_lengths[q])].tolist()))
            demo.report.image(tile([to_uint8_image(big[0])] + panels, ncols=len(panels) + 1,
                                   labels=["image"] + labels),
                              caption=f"Q: “{question}” — the model answers “{W.ANSWERS[given]}”"
                                      f" (truth: “{W.ANSWERS[truth]}”); forced: "
                                      f"“{W.ANSWERS[alt]}”")
            shown += 1


def _video_section(demo: Demo) -> None:
    """Spatiotemporal maps of the C3D for each clip's true action, methods side by side."""
    from mmexplain.adapters.shapes import CLIP_MEAN, CLIP_STD
    from mmexplain.data import shapes as W
    from mmexplain.render import overlay_clip, write_mp4

    print(f"actions: spatiotemporal maps of {len(demo.clips)} clips ...", flush=True)
    demo.report.section("Actions: spatiotemporal maps of a C3D (T×H×W)")
    clips = demo.clips
    videos = (clips.videos - CLIP_MEAN) / CLIP_STD
    vsize = tuple(clips.videos.shape[-3:])
    for i in range(len(clips)):
        action = clips.actions[i:i + 1]
        frames = []
        for m in demo.methods:
            expl = demo.cams[m]["c3d"](videos[i:i + 1], target=action.view(1, 1))
            maps = P.evidence(resize_grid(expl.maps, vsize)[0, 0])  # (T, H, W)
            hits = metrics.pointing_game(maps, clips.actor_masks[i], tolerance=TOLERANCE)
            demo.tally.add(m, "action_pointing", hits.float().tolist())
            if i < min(demo.args.show, 4):
                frames.append(overlay_clip(_big(clips.videos[i]), maps))
        if frames:
            path = demo.out / f"clip{i}.mp4"
            write_mp4(np.concatenate(frames, axis=2), path, fps=8)  # methods side by side
            demo.report.video(path, caption=f"“{W.ACTIONS[int(action)]}” — "
                                            + " | ".join(get_method(m).label
                                                         for m in demo.methods))


def _figures(demo: Demo, checks: dict[str, float], regions: list[Any],
             faithful: dict[str, list[Any]]) -> dict[str, Any]:
    """Every measured figure, per method."""
    methods = demo.methods
    figures: dict[str, Any] = {"checks": checks, "tolerance_px": TOLERANCE,
                               "seed": demo.args.seed, "scenes": len(demo.scenes),
                               "clips": len(demo.clips), "methods": {}}
    summaries = {kind: P.summarize_faithfulness(entries, methods)
                 for kind, entries in faithful.items()}
    region = P.summarize_regions(regions, methods)
    for m in methods:
        f: dict[str, Any] = {}
        for key in ("word_pointing", "vqa_pointing", "action_pointing", "word_rank_correlation",
                    "vqa_rank_correlation", "instances_covered"):
            f[key] = _mean(demo.tally.get(m, key))
        f["region_ratio_mean"], f["region_ratio_sem"] = region[m]["mean"], region[m]["sem"]
        for kind, summary in summaries.items():
            f[f"{kind}_average_drop"] = summary[m]["average_drop"]
            f[f"{kind}_increase_in_confidence"] = summary[m]["increase_in_confidence"]
            pair = {"gradcam": "gradcam++", "gradcam++": "gradcam"}.get(m)
            if pair in summary[m].get("win_vs", {}):  # the papers' Win %: Grad-CAM vs Grad-CAM++
                f[f"{kind}_win_percent"] = summary[m]["win_vs"][pair]
            if len(methods) > 2:  # the share of inputs each method wins among all shown
                f[f"{kind}_win_share"] = summary[m]["win"]
        figures["methods"][m] = f
    return figures


#: The figures' names in the report, and the factor to one unit (per cent where a share).
FIGURE_NAMES = {
    "word_pointing": ("Pointing: caption words (%)", 100),
    "vqa_pointing": ("Pointing: VQA answers (%)", 100),
    "action_pointing": ("Pointing: action frames (%)", 100),
    "word_rank_correlation": ("Rank correlation with the masks: words (Spearman)", 1),
    "vqa_rank_correlation": ("Rank correlation with the masks: answers (Spearman)", 1),
    "instances_covered": ("Instances covered, words naming several (%)", 100),
    "region_ratio_mean": ("Region ratio inside/outside the box (mean)", 1),
    "region_ratio_sem": ("Region ratio (standard error)", 1),
}


def _figure_name(key: str) -> tuple[str, float]:
    if key in FIGURE_NAMES:
        return FIGURE_NAMES[key]
    kind, _, measure = key.partition("_")
    what = {"average_drop": "Average Drop (%, lower is better)",
            "increase_in_confidence": "Increase in Confidence (%)",
            "win_percent": "Win %, Grad-CAM vs Grad-CAM++",
            "win_share": "Win share among all methods (%)"}.get(measure, measure)
    return f"{what}: {'VQA' if kind == 'vqa' else 'clips'}", 1


def _write(demo: Demo, figures: dict[str, Any], checks: dict[str, float]) -> None:
    """The figures table (first on the page), report.html, figures.json (NaN as null: valid
    JSON), and the printed summary."""
    methods, report = demo.methods, demo.report
    rows = []
    for key in figures["methods"][methods[0]]:
        name, scale = _figure_name(key)
        rows.append({"figure": name, **{get_method(m).label: _scaled(
            figures["methods"][m].get(key), scale) for m in methods}})
    with report.first():
        report.section("Figures")
        report.table(rows, caption="Pointing: share of maps whose maximum falls on the right "
                     "object. Rank correlation: Spearman with the masks. Region ratio: mean "
                     "activation inside the region's box over outside. Average Drop, Increase "
                     "in Confidence and Win % with E = L∘I (Grad-CAM++ eq. 25). n/a: nothing "
                     "to measure in this run.")
        report.table([{"check": k, "value (%)": _scaled(v, 100)} for k, v in checks.items()],
                     caption="The models work: accuracy on these scenes and clips.")
    html = report.save(demo.out / "report.html")
    (demo.out / "figures.json").write_text(json.dumps(_json_safe(figures), indent=2,
                                                      allow_nan=False) + "\n")
    for m in methods:
        f = figures["methods"][m]
        print(f"{get_method(m).label:>10}: pointing words {_pct(f['word_pointing'])}, VQA answers"
              f" {_pct(f['vqa_pointing'])}, action frames {_pct(f['action_pointing'])}; rank corr."
              f" words {f['word_rank_correlation']:.2f}; region ratio "
              f"{f.get('region_ratio_mean', float('nan')):.2f}; instances covered "
              f"{_pct(f['instances_covered'])}")
    print(f"report: {html.resolve()}")
    print(f"figures: {(demo.out / 'figures.json').resolve()} ({figures['seconds']} s)")


def _scaled(value: Any, scale: float) -> Any:
    if not isinstance(value, (int, float)) or value != value:  # None or NaN
        return "n/a"
    return round(value * scale, 2)


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{value:.0%}"


def _json_safe(value: Any) -> Any:
    """NaN and inf become null (json.dumps would write bare NaN, which is not JSON)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _alternative(truth: int, given: int, W: Any) -> int:
    """An answer of the same kind the model did not give ("what if it said yellow?")."""
    name = W.ANSWERS[truth]
    for group in (W.COLORS, W.SHAPES, W.NUMBER_WORDS, ("yes", "no")):
        if name in group:
            options = [W.ANSWERS.index(a) for a in group if W.ANSWERS.index(a) not in (truth,
                                                                                       given)]
            return options[0] if options else given
    return given
