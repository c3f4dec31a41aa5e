"""``mmexplain demo``: the main job on the embedded default, with no downloads.

Explains the shapes-world models shipped in the package on freshly generated
scenes and clips (world seed ``--seed``, never seen in training), two sets side
by side: the models trained with explanation supervision (``supervised``) and
their twins trained on the task alone (``plain``, never trained for any method):

- the captioner: one map per visual word (colour and shape words) of the
  ground-truth caption, all words from one backward;
- the VQA model: maps for its own answer and for a forced alternative answer;
- the C3D: spatiotemporal maps of the true action.

Every registered method side by side, measured against the world's exact masks
with the papers' protocols (pointing game, rank correlation with the masks as
"human attention", DenseCap-style inside/outside box ratio, Average Drop / %
Increase in Confidence / Win %, instance coverage) and with deletion and
insertion curves (RISE), written to one self-contained HTML report (tables and
plots) and a JSON of the figures (``figures["sets"][set]["methods"][method]``).
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
#: The model sets, each a suffix of the shipped adapters' names: trained with explanation
#: supervision (GAIN) or on the task alone (scripts/train_shapes.py --plain).
SETS = {"supervised": "", "plain": "-plain"}
#: The demo's three models (the section's key -> the shipped adapter's name).
MODELS = {"cap": "shapes-captioner", "vqa": "shapes-vqa", "c3d": "shapes-c3d"}
#: How a set is named in the report's labels.
SET_TAGS = {"supervised": "sup.", "plain": "plain"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="mmexplain-out/demo", help="output folder")
    parser.add_argument("--method", default="all",
                        help="which registered method(s) to run, side by side: one name, a "
                        "comma-separated list, 'both' (gradcam,gradcam++) or 'all' (default: "
                        "all: " + ", ".join(list_methods()) + ")")
    parser.add_argument("--sets", default=",".join(SETS),
                        help="which model sets, side by side: 'supervised' (trained with "
                        "explanation supervision), 'plain' (trained on the task alone) or "
                        "both, comma-separated (default)")
    parser.add_argument("--images", type=int, default=40, help="scenes to explain")
    parser.add_argument("--clips", type=int, default=12, help="clips to explain")
    parser.add_argument("--curves", type=int, default=3, help="scenes whose VQA answers get "
                        "deletion and insertion curves (0: none)")
    parser.add_argument("--seed", type=int, default=2026, help="world seed of the evaluation set")
    parser.add_argument("--show", type=int, default=6, help="examples drawn in the report")
    parser.add_argument("--no-modern", dest="modern", action="store_false",
                        help="leave out the modern models (shapes-vlm, a LLaVA-class VLM, and "
                        "shapes-video, a VideoMAE), explained beside the classic ones")


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
    """What every section of the demo shares: the world's data (the same scenes and clips
    for every set), the models and the explainers of every method per set, the report
    being written and the per-method tally of each set."""

    args: argparse.Namespace
    methods: list[str]
    sets: list[str]
    out: Path
    world: Any
    scenes: Any
    clips: Any
    models: dict[str, dict[str, Any]]
    cams: dict[str, dict[str, dict[str, Any]]]
    report: Any
    tally: dict[str, Tally] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(self.scenes.images.shape[-2:])

    def short(self, method: str) -> str:
        return get_method(method).short

    def rows(self) -> list[tuple[str, str, str]]:
        """(set, method, label) of each row of an example's panels: every set's methods."""
        tag = (lambda s: f"{SET_TAGS[s]} ") if len(self.sets) > 1 else (lambda s: "")
        return [(s, m, f"{tag(s)}{self.short(m)}") for s in self.sets for m in self.methods]


def chosen_sets(value: str) -> list[str]:
    """The ``--sets`` value as a list of set names, in SETS' order. A set whose weights are
    not shipped is left out of the default (both) with a note, and is an error when asked
    for alone."""
    from mmexplain.adapters.shapes import WEIGHT_FILES, weights_dir

    names = [v.strip() for v in str(value).split(",") if v.strip()]
    if not names or any(n not in SETS for n in names):
        raise bad_value("--sets", "set names among " + ", ".join(SETS) + ", comma-separated",
                        value)
    shipped = [s for s in SETS if s in names and all(
        (weights_dir() / WEIGHT_FILES[name + SETS[s]]).is_file() for name in MODELS.values())]
    if not shipped:
        raise bad_value("--sets", "model sets whose weights are shipped (run "
                        "scripts/train_shapes.py, with --plain for the plain set)", value)
    for s in (s for s in SETS if s in names and s not in shipped):
        print(f"note: the {s} models' weights are not shipped (scripts/train_shapes.py"
              f"{' --plain' if SETS[s] else ''} makes them); measuring "
              + ", ".join(shipped) + " only")
    return shipped


def run(args: argparse.Namespace) -> int:
    for arg in ("images", "clips", "show", "curves"):
        if getattr(args, arg) < (1 if arg in ("images", "clips") else 0):
            raise bad_value(f"--{arg}", "a positive number" if arg in ("images", "clips")
                            else "a number >= 0", getattr(args, arg))
    start = time.time()
    demo = _setup(args)
    checks = {s: _model_checks(demo, s) for s in demo.sets}
    _introduce(demo)
    _caption_section(demo)
    print("regions, faithfulness and deletion/insertion curves ...", flush=True)
    records = demo.world.images(len(demo.scenes))  # shared by the sets
    clip_records = demo.world.clips(len(demo.clips))
    measured = {s: _measure(demo, s, records, clip_records) for s in demo.sets}
    _vqa_section(demo)
    _video_section(demo)
    figures = _figures(demo, checks, measured)
    if getattr(demo.args, "modern", True):
        from mmexplain import demo_modern

        figures["modern"] = demo_modern.section(demo)
    figures["seconds"] = round(time.time() - start, 1)
    _write(demo, figures)
    return 0


def _setup(args: argparse.Namespace) -> Demo:
    from mmexplain.adapters import get_adapter
    from mmexplain.data import shapes as W
    from mmexplain.render import Report

    methods, sets = chosen_methods(args.method), chosen_sets(args.sets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = W.ShapesWorld(seed=args.seed)
    models = {s: {kind: get_adapter(name + SETS[s]) for kind, name in MODELS.items()}
              for s in sets}
    cams = {s: {m: {kind: make_cam(model, m) for kind, model in models[s].items()}
                for m in methods} for s in sets}
    report = Report("mmexplain demo: what the shapes-world models look at")
    return Demo(args, methods, sets, out, world, world.image_batch(args.images),
                world.clip_batch(args.clips), models, cams, report,
                {s: Tally() for s in sets})


def _model_checks(demo: Demo, s: str) -> dict[str, float]:
    from mmexplain.tasks.shapes import action_accuracy, caption_accuracy, vqa_accuracy

    scenes, clips, models = demo.scenes, demo.clips, demo.models[s]
    checks = {
        "caption_visual_words_correct": caption_accuracy(models["cap"].model, scenes),
        "vqa_accuracy": vqa_accuracy(models["vqa"].model, scenes),
        "action_accuracy": action_accuracy(models["c3d"].model, clips),
    }
    print(f"{s} models: caption visual words {checks['caption_visual_words_correct']:.0%} "
          f"correct, VQA {checks['vqa_accuracy']:.0%} accurate, actions "
          f"{checks['action_accuracy']:.0%} recognised ({len(scenes)} scenes, {len(clips)} "
          "clips)")
    return checks


def _introduce(demo: Demo) -> None:
    sets = {"supervised": "the shipped models trained with explanation supervision (GAIN, "
                          "Li et al. 2018: their Grad-CAM maps pulled towards the objects' "
                          "masks, so their evidence is known to lie on the objects; the other "
                          "methods were never trained for)",
            "plain": "their twins trained on the task alone (the same architectures, seeds "
                     "and data; never trained for any explanation method)"}
    demo.report.text(
        f"{len(demo.scenes)} generated scenes and {len(demo.clips)} clips (world seed "
        f"{demo.args.seed}, never seen in training), explained with "
        + ", ".join(get_method(m).label for m in demo.methods) + ". Maps are measured against "
        f"the exact object masks; pointing tolerance {TOLERANCE} px (the paper's 15 px at 224 "
        "px, scaled to 64 px). Model sets: "
        + "; ".join(f"{s} — {sets[s]}" for s in demo.sets) + ".")


def _caption_section(demo: Demo) -> None:
    """One map per visual word of each scene's caption (Grad-CAM paper, sec. 8.1.1)."""
    from mmexplain.render import overlay, tile, to_uint8_image
    from mmexplain.tasks.caption import WordLogProbs

    print(f"captions: per-word maps of {len(demo.scenes)} scenes ...", flush=True)
    demo.report.section("Captioning: one map per visual word (Grad-CAM paper, sec. 8.1.1)")
    scenes, shown = demo.scenes, 0
    for i in range(len(scenes)):
        image = scenes.images[i:i + 1]
        tokens = scenes.captions[i:i + 1, 1:]  # words then <end>
        refs = scenes.caption_refs[i, 1:]  # (T, M) objects named by each token
        positions = [t for t in range(refs.shape[0]) if bool(refs[t].any())]
        if not positions:
            continue
        word_masks = torch.stack([scenes.masks[i][refs[t]].any(0) for t in positions])  # (K,H,W)
        instances = [scenes.masks[i][refs[t]] for t in positions]
        words = demo.models[demo.sets[0]]["cap"].vocab.words(tokens[0, positions].tolist())
        draw = shown < demo.args.show
        panels, labels, big = [], [], _big(image)
        for s, m, label in demo.rows():
            expl = demo.cams[s][m]["cap"](image, target=WordLogProbs(positions), tokens=tokens)
            maps = P.evidence(resize_grid(expl.maps, demo.size)[0])  # (K, H, W)
            _tally_words(demo.tally[s], m, maps, word_masks, instances)
            if draw:
                panels += [to_uint8_image(big[0])] + [overlay(big[0], maps[k])
                                                      for k in range(len(positions))]
                labels += [label] + [f"{label}: {w}" for w in words]
        if draw:
            cap = demo.models[demo.sets[0]]["cap"]
            caption = " ".join(cap.vocab.words(tokens[0].tolist())).replace(" <end>", "")
            says = "; ".join(f"the {s} model says: “{demo.models[s]['cap'].captions(image).texts[0]}”"
                             for s in demo.sets)
            demo.report.image(tile(panels, ncols=len(positions) + 1, labels=labels),
                              caption=f"caption: “{caption}” — {says}")
            shown += 1


def _tally_words(tally: Tally, m: str, maps: torch.Tensor, word_masks: torch.Tensor,
                 instances: list[torch.Tensor]) -> None:
    """Pointing and rank correlation per word; coverage of the words naming several objects."""
    hits = metrics.pointing_game(maps, word_masks, tolerance=TOLERANCE)
    tally.add(m, "word_pointing", hits.float().tolist())
    tally.add(m, "word_rank_correlation",
              metrics.rank_correlation(maps, word_masks.float()).tolist())
    for k, inst in enumerate(instances):  # several instances named by one word
        if inst.shape[0] > 1:
            tally.add(m, "instances_covered", _covered(maps[k], inst) / inst.shape[0])


def _vqa_section(demo: Demo) -> None:
    """Each set's answer and a forced alternative (sec. 8.2)."""
    from mmexplain.data import shapes as W
    from mmexplain.render import tile, to_uint8_image

    print(f"VQA: maps of {len(demo.scenes.questions)} answers and forced answers ...", flush=True)
    demo.report.section("VQA: the model's answer and a forced alternative (sec. 8.2)")
    scenes, shown = demo.scenes, 0
    for q in range(len(scenes.questions)):
        i = int(scenes.question_image[q])
        image = scenes.images[i:i + 1]
        ctx = {"question": scenes.questions[q:q + 1],
               "question_lengths": scenes.question_lengths[q:q + 1]}
        truth = int(scenes.answers[q])
        objects = scenes.answer_objects[q, : int(scenes.num_objects[i])]
        mask = scenes.masks[i, : objects.shape[0]][objects].any(0) if objects.any() else None
        draw = shown < demo.args.show and mask is not None
        panels, labels, said = [], [], []
        for s in demo.sets:
            with torch.no_grad():
                given = int(demo.models[s]["vqa"].model(image, **ctx).argmax(1))
            alt = _alternative(truth, given, W)
            said.append(f"{s}: “{W.ANSWERS[given]}” (forced: “{W.ANSWERS[alt]}”)")
            if draw:  # a row per set: the image, then each method's two maps
                panels.append(to_uint8_image(_big(image)[0]))
                labels.append(f"{s} models" if len(demo.sets) > 1 else "image")
            _vqa_maps(demo, s, image, ctx, (given, alt, truth), mask, (panels, labels) if draw
                      else None)
        if draw:
            vocab = demo.models[demo.sets[0]]["vqa"].question_vocab
            question = " ".join(vocab.words(
                scenes.questions[q, : int(scenes.question_lengths[q])].tolist()))
            demo.report.image(tile(panels, ncols=2 * len(demo.methods) + 1, labels=labels),
                              caption=f"Q: “{question}” (truth: “{W.ANSWERS[truth]}”) — the "
                                      "models answer " + "; ".join(said))
            shown += 1


def _vqa_maps(demo: Demo, s: str, image: torch.Tensor, ctx: dict[str, torch.Tensor],
              answers: tuple[int, int, int], mask: torch.Tensor | None,
              drawn: tuple[list[Any], list[str]] | None) -> None:
    """The maps of one set's given and forced answers by every method: pointing and rank
    correlation of a correct answer about objects tallied, overlays added to ``drawn``."""
    from mmexplain.data import shapes as W
    from mmexplain.render import overlay
    from mmexplain.tasks.vqa import AnswerScore

    given, alt, truth = answers
    big = _big(image)
    for m in demo.methods:
        expl = demo.cams[s][m]["vqa"](image, target=AnswerScore([given, alt]), **ctx)
        maps = P.evidence(resize_grid(expl.maps, demo.size)[0])  # (2, H, W)
        if mask is not None and given == truth:
            demo.tally[s].add(m, "vqa_pointing",
                              float(metrics.pointing_game(maps[0], mask, tolerance=TOLERANCE)))
            demo.tally[s].add(m, "vqa_rank_correlation",
                              float(metrics.rank_correlation(maps[0], P.blurred(mask))))
        if drawn is not None:
            tag = f"{SET_TAGS[s]} " if len(demo.sets) > 1 else ""
            drawn[0].extend([overlay(big[0], maps[0]), overlay(big[0], maps[1])])
            drawn[1].extend([f"{tag}{demo.short(m)}: {W.ANSWERS[given]}",
                             f"{tag}{demo.short(m)}: {W.ANSWERS[alt]}?"])


def _video_section(demo: Demo) -> None:
    """Spatiotemporal maps of each set's C3D for each clip's true action: methods side by
    side, one row per set."""
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
        draw = i < min(demo.args.show, 4)
        rows = []
        for s in demo.sets:
            frames = []
            for m in demo.methods:
                expl = demo.cams[s][m]["c3d"](videos[i:i + 1], target=action.view(1, 1))
                maps = P.evidence(resize_grid(expl.maps, vsize)[0, 0])  # (T, H, W)
                hits = metrics.pointing_game(maps, clips.actor_masks[i], tolerance=TOLERANCE)
                demo.tally[s].add(m, "action_pointing", hits.float().tolist())
                if draw:
                    frames.append(overlay_clip(_big(clips.videos[i]), maps))
            if draw:
                rows.append(np.concatenate(frames, axis=2))  # methods side by side
        if draw:
            path = demo.out / f"clip{i}.mp4"
            write_mp4(np.concatenate(rows, axis=1), path, fps=8)  # a row per set
            demo.report.video(path, caption=f"“{W.ACTIONS[int(action)]}” — "
                              + " | ".join(get_method(m).label for m in demo.methods)
                              + (" (rows: " + ", ".join(demo.sets) + " models)"
                                 if len(demo.sets) > 1 else ""))


def _measure(demo: Demo, s: str, records: list[Any], clip_records: list[Any]
             ) -> dict[str, Any]:
    """One set's region ratios (captioner), faithfulness entries (VQA answers and clips) and
    deletion / insertion summaries (the VQA answers of the first ``--curves`` scenes)."""
    models, methods = demo.models[s], demo.methods
    regions = [e for scene in records
               for e in P.shapes_regions(models["cap"], scene, methods=methods)]
    faithful = {"vqa": [e for scene in records for e in
                        P.shapes_faithfulness(models["vqa"], scene, methods=methods)],
                "clip": [e for clip in clip_records for e in
                         P.clip_faithfulness(models["c3d"], clip, methods=methods)]}
    curves = {mode: P.summarize_perturbation(
        [e for scene in records[: demo.args.curves]
         for e in P.shapes_perturbation(models["vqa"], scene, mode=mode, methods=methods)],
        methods) for mode in ("deletion", "insertion")} if demo.args.curves else {}
    return {"regions": regions, "faithful": faithful, "curves": curves}


def _figures(demo: Demo, checks: dict[str, dict[str, float]], measured: dict[str, Any]
             ) -> dict[str, Any]:
    """Every measured figure, per set and method."""
    figures: dict[str, Any] = {"tolerance_px": TOLERANCE, "seed": demo.args.seed,
                               "scenes": len(demo.scenes), "clips": len(demo.clips),
                               "curve_scenes": min(demo.args.curves, len(demo.scenes)),
                               "sets": {}}
    for s in demo.sets:
        figures["sets"][s] = {"models": {k: n + SETS[s] for k, n in MODELS.items()},
                              "checks": checks[s],
                              "methods": _set_figures(demo, s, measured[s]),
                              "curves": {mode: {m: summary[m]["curve"] for m in demo.methods}
                                         for mode, summary in measured[s]["curves"].items()}}
    return figures


def _set_figures(demo: Demo, s: str, measured: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One set's figures per method."""
    methods = demo.methods
    summaries = {kind: P.summarize_faithfulness(entries, methods)
                 for kind, entries in measured["faithful"].items()}
    region = P.summarize_regions(measured["regions"], methods)
    out = {}
    for m in methods:
        f: dict[str, Any] = {}
        for key in ("word_pointing", "vqa_pointing", "action_pointing", "word_rank_correlation",
                    "vqa_rank_correlation", "instances_covered"):
            f[key] = _mean(demo.tally[s].get(m, key))
        f["region_ratio_mean"], f["region_ratio_sem"] = region[m]["mean"], region[m]["sem"]
        for kind, summary in summaries.items():
            f[f"{kind}_average_drop"] = summary[m]["average_drop"]
            f[f"{kind}_increase_in_confidence"] = summary[m]["increase_in_confidence"]
            pair = {"gradcam": "gradcam++", "gradcam++": "gradcam"}.get(m)
            if pair in summary[m].get("win_vs", {}):  # the papers' Win %: Grad-CAM vs Grad-CAM++
                f[f"{kind}_win_percent"] = summary[m]["win_vs"][pair]
            if len(methods) > 2:  # the share of inputs each method wins among all shown
                f[f"{kind}_win_share"] = summary[m]["win"]
        for mode, summary in measured["curves"].items():
            f[f"vqa_{mode}_auc"] = summary[m]["auc"]["mean"]
        out[m] = f
    return out


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
    "vqa_deletion_auc": ("Deletion AUC: VQA answers (lower is better)", 1),
    "vqa_insertion_auc": ("Insertion AUC: VQA answers (higher is better)", 1),
}
#: The faithfulness figures drawn as bars, per set and method, and their short names there.
BAR_FIGURES = {"vqa_average_drop": "Avg. Drop, VQA", "clip_average_drop": "Avg. Drop, clips",
               "vqa_increase_in_confidence": "Increase, VQA",
               "clip_increase_in_confidence": "Increase, clips"}


def _figure_name(key: str) -> tuple[str, float]:
    if key in FIGURE_NAMES:
        return FIGURE_NAMES[key]
    kind, _, measure = key.partition("_")
    what = {"average_drop": "Average Drop (%, lower is better)",
            "increase_in_confidence": "Increase in Confidence (%)",
            "win_percent": "Win %, Grad-CAM vs Grad-CAM++",
            "win_share": "Win share among all methods (%)"}.get(measure, measure)
    return f"{what}: {'VQA' if kind == 'vqa' else 'clips'}", 1


def _write(demo: Demo, figures: dict[str, Any]) -> None:
    """The figures tables and plots (first on the page), report.html, figures.json (NaN as
    null: valid JSON), and the printed summary."""
    report = demo.report
    with report.first():
        report.section("Figures")
        for s in demo.sets:
            _set_tables(demo, s, figures["sets"][s])
        if len(demo.sets) > 1 and {"gradcam", "gradcam++"} <= set(demo.methods):
            report.table(_papers_rows(demo, figures), caption="The papers' pair on both sets: "
                         "Grad-CAM against Grad-CAM++ on the supervised models (trained with "
                         "Grad-CAM supervision) and on the plain ones (trained for neither).")
        _plots(demo, figures)
    html = report.save(demo.out / "report.html")
    (demo.out / "figures.json").write_text(json.dumps(_json_safe(figures), indent=2,
                                                      allow_nan=False) + "\n")
    for s in demo.sets:
        for m in demo.methods:
            f = figures["sets"][s]["methods"][m]
            print(f"{s:>10} {get_method(m).label:>10}: pointing words {_pct(f['word_pointing'])}"
                  f", VQA answers {_pct(f['vqa_pointing'])}, action frames "
                  f"{_pct(f['action_pointing'])}; instances covered "
                  f"{_pct(f['instances_covered'])}; Average Drop VQA "
                  f"{_num(f.get('vqa_average_drop'))}, clips {_num(f.get('clip_average_drop'))}")
    print(f"report: {html.resolve()}")
    print(f"figures: {(demo.out / 'figures.json').resolve()} ({figures['seconds']} s)")


def _set_tables(demo: Demo, s: str, figures: dict[str, Any]) -> None:
    """One set's figures table (rows: figures, columns: methods) and its accuracy checks."""
    methods = demo.methods
    rows = []
    for key in figures["methods"][methods[0]]:
        name, scale = _figure_name(key)
        rows.append({"figure": name, **{get_method(m).label: _scaled(
            figures["methods"][m].get(key), scale) for m in methods}})
    demo.report.table(rows, caption=f"{s} models ({', '.join(figures['models'].values())}). "
                      "Pointing: share of maps whose maximum falls on the right object. Rank "
                      "correlation: Spearman with the masks. Region ratio: mean activation "
                      "inside the region's box over outside. Average Drop, Increase in "
                      "Confidence and Win % with E = L∘I (Grad-CAM++ eq. 25). Deletion / "
                      "insertion AUC: the answer's confidence as cells are removed / inserted "
                      "in the map's order (RISE). n/a: nothing to measure in this run.")
    demo.report.table([{"check": k, "value (%)": _scaled(v, 100)}
                       for k, v in figures["checks"].items()],
                      caption=f"The {s} models work: accuracy on these scenes and clips.")


def _papers_rows(demo: Demo, figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the papers' comparisons: each figure, Grad-CAM and Grad-CAM++ per set."""
    keys = ("word_pointing", "vqa_pointing", "action_pointing", "instances_covered",
            "vqa_average_drop", "vqa_increase_in_confidence", "vqa_win_percent",
            "clip_average_drop", "clip_increase_in_confidence", "clip_win_percent")
    rows = []
    for key in keys:
        name, scale = _figure_name(key)
        row: dict[str, Any] = {"figure": name}
        for s in demo.sets:
            for m in ("gradcam", "gradcam++"):
                row[f"{s}: {get_method(m).label}"] = _scaled(
                    figures["sets"][s]["methods"][m].get(key), scale)
        rows.append(row)
    return rows


def _plots(demo: Demo, figures: dict[str, Any]) -> None:
    """Bars of the faithfulness figures per set and method; deletion and insertion curves
    per method of each set."""
    from mmexplain import plots

    label = {m: get_method(m).label for m in demo.methods}
    bars = {f"{name}\n{s}": {label[m]: figures["sets"][s]["methods"][m][key]
                             for m in demo.methods}
            for key, name in BAR_FIGURES.items() for s in demo.sets}
    demo.report.plot(plots.bars(bars, title="Faithfulness per method and model set",
                                ylabel="%", size=(1200, 460)),
                     caption="Average Drop (lower is better) and Increase in Confidence (higher "
                     "is better), VQA answers and clips, each model set.")
    for s in demo.sets:
        for mode, curves in figures["sets"][s]["curves"].items():
            aucs = {label[m]: figures["sets"][s]["methods"][m][f"vqa_{mode}_auc"]
                    for m in demo.methods}
            demo.report.plot(plots.curves(
                {label[m]: curves[m] for m in demo.methods if curves[m] is not None},
                auc={k: v for k, v in aucs.items() if v is not None},
                title=f"{mode.capitalize()}, VQA answers, {s} models",
                xlabel=f"fraction of the cells {'removed' if mode == 'deletion' else 'inserted'}",
                ylabel="confidence of the answer"),
                caption=f"{mode.capitalize()} curves (RISE) of the {s} models' answers to the "
                        f"questions of {figures['curve_scenes']} scenes.")


def _scaled(value: Any, scale: float) -> Any:
    if not isinstance(value, (int, float)) or value != value:  # None or NaN
        return "n/a"
    return round(value * scale, 2)


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{value:.0%}"


def _num(value: Any) -> str:
    return "n/a" if not isinstance(value, (int, float)) or value != value else f"{value:.1f}"


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
