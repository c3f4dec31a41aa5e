"""``mmexplain eval``: each protocol end to end, its summary against the metric functions
computed here on the same items, sharding under torchrun, resuming, the real-file readers."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import mmexplain as mx
from mmexplain.cli import main
from mmexplain.data.shapes import ShapesWorld
from mmexplain.evaluate import load_model
from mmexplain.metrics import (
    average_drop,
    box_inside_outside_ratio,
    explanation_input,
    increase_in_confidence,
    localization_error,
    mean_sem,
    pointing_accuracy,
    pointing_game,
    rank_correlation,
    summarize_ratios,
    win_percent,
)
from mmexplain.runs import read_records
from mmexplain.tasks.caption import CaptionLogProb, WordLogProbs

from conftest import shared_file

SEED = 2  # the command's default world seed, and the seed of its random weights
CAMS = {"gradcam": mx.GradCAM, "gradcam++": mx.GradCAMPlusPlus}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread, as torchrun's workers: on a busy 2-core machine two threads
    contending with other jobs made these tiny models over ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def empty_torch_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random weights whatever the machine's torch cache holds."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def run_eval(out: Path, *argv: str) -> dict:
    """``mmexplain eval ...`` in process with random weights; the summary it wrote (and printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["eval", *argv, "--weights", "random", "--no-progress", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    text = printed.getvalue()
    assert json.loads(text[text.index("{\n"):]) == summary
    return summary


def records(out: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(out.glob("records.rank*.jsonl"))
            for line in path.read_text().splitlines()]


def entries(out: Path) -> list[dict]:
    return [e for r in records(out) for e in r["entries"]]


@pytest.fixture(scope="module")
def pointing_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A single-process pointing run on 4 shapes scenes."""
    out = tmp_path_factory.mktemp("pointing")
    return out, run_eval(out, "pointing", "--limit", "4")


# --------------------------------------------------------------------------- summaries


def test_pointing_summary_is_the_pointing_accuracy_of_the_word_maps(pointing_run) -> None:
    out, summary = pointing_run
    captioner = load_model("shapes-captioner", "random", seed=SEED)
    world = ShapesWorld(seed=SEED)
    hits: dict[str, list[bool]] = {m: [] for m in CAMS}
    for i in range(4):
        scene = world.image(i)
        positions = [k for k, refs in enumerate(scene.caption.refs) if refs]
        masks = torch.from_numpy(np.stack([scene.mask_of(scene.caption.refs[p])
                                           for p in positions]))
        tokens = captioner.caption_context([list(scene.caption.tokens)])["tokens"]
        image = torch.from_numpy(scene.image)[None]
        for method, cam in CAMS.items():
            expl = cam(captioner)(image, target=WordLogProbs(positions), tokens=tokens)
            maps = expl.upsample((64, 64)).maps[0]  # (K, 64, 64)
            hits[method] += pointing_game(maps, masks, tolerance=4).tolist()
    for method in CAMS:
        assert summary[method] == {"hits": sum(hits[method]),
                                   "misses": len(hits[method]) - sum(hits[method]),
                                   "accuracy": pointing_accuracy(hits[method])}
    assert summary["items"] == 4 and summary["entries"] == len(hits["gradcam"])
    assert [e["word"] for e in entries(out)][:2] == [w for w, r in zip(
        world.image(0).caption.tokens, world.image(0).caption.refs) if r][:2]


def test_densecap_summary_is_the_mean_ratio_of_the_region_caption_maps(tmp_path: Path) -> None:
    summary = run_eval(tmp_path, "densecap", "--limit", "2")
    captioner = load_model("shapes-captioner", "random", seed=SEED)
    world = ShapesWorld(seed=SEED)
    ratios: dict[str, list[float]] = {m: [] for m in CAMS}
    for i in range(2):
        scene = world.image(i)
        image = torch.from_numpy(scene.image)[None]
        for obj in scene.objects:  # one region per object: its box, "a <colour> <shape>"
            tokens = captioner.caption_context([f"a {obj.color} {obj.shape}"])["tokens"]
            for method, cam in CAMS.items():
                expl = cam(captioner)(image, target=CaptionLogProb(), tokens=tokens)
                ratio = box_inside_outside_ratio(expl.upsample((64, 64)).maps[0, 0],
                                                 torch.tensor([list(obj.bbox)]))
                ratios[method].append(float(ratio[0]))
    for method in CAMS:
        expected = summarize_ratios(ratios[method])
        assert summary[method]["n"] == expected.n and summary[method]["undefined"] == 0
        assert summary[method]["mean"] == pytest.approx(expected.mean, rel=1e-5)
        assert summary[method]["sem"] == pytest.approx(expected.sem, rel=1e-4)
    assert [e["caption"] for e in entries(tmp_path)] == [
        f"a {o.color} {o.shape}" for i in range(2) for o in world.image(i).objects]


def test_faithfulness_summary_is_drop_increase_and_win_of_the_explanation_inputs(
        tmp_path: Path) -> None:
    summary = run_eval(tmp_path, "faithfulness", "--limit", "1")
    vqa = load_model("shapes-vqa", "random", seed=SEED).eval()  # (batch norm's running stats)
    scene = ShapesWorld(seed=SEED).image(0)
    image = torch.from_numpy(scene.image)[None]
    y, o = [], {m: [] for m in CAMS}
    for qa in scene.qas:  # one input per question; the confidence is the answer's probability
        context = vqa.question_context(qa.question)
        with torch.no_grad():
            probs = vqa(image, **context).softmax(dim=1)[0]
        answer = int(probs.argmax())
        y.append(float(probs[answer]))
        for method, cam in CAMS.items():
            expl = cam(vqa)(image, target=answer, **context)
            e = explanation_input(image, expl.maps[:, 0])  # E = L o I, eq. 25
            with torch.no_grad():
                o[method].append(float(vqa(e, **context).softmax(dim=1)[0, answer]))
    assert summary["entries"] == len(scene.qas)
    for method, other in (("gradcam", "gradcam++"), ("gradcam++", "gradcam")):
        assert summary[method]["average_drop"] == pytest.approx(average_drop(y, o[method]),
                                                                abs=1e-4)
        assert summary[method]["increase_in_confidence"] == increase_in_confidence(y, o[method])
        assert summary[method]["win"] == win_percent(o[method], o[other], y)
    assert summary["gradcam"]["win"] + summary["gradcam++"]["win"] == 100


def test_faithfulness_with_the_captioner_explains_its_own_caption(tmp_path: Path) -> None:
    summary = run_eval(tmp_path, "faithfulness", "--model", "shapes-captioner", "--limit", "1",
                       "--method", "gradcam")
    captioner = load_model("shapes-captioner", "random", seed=SEED)
    image = torch.from_numpy(ShapesWorld(seed=SEED).image(0).image)[None]
    words = captioner.captions(image).words[0]
    tokens = captioner.caption_context([words])["tokens"]
    (entry,) = entries(tmp_path)  # one input: the image with its own greedy caption
    assert entry["caption"] == " ".join(words)
    assert entry["Y"] == pytest.approx(math.exp(float(captioner.score(image, tokens)[0])),
                                       rel=1e-5)  # the confidence p(caption | image)
    assert summary["gradcam"]["average_drop"] == average_drop([entry["Y"]],
                                                              [entry["O"]["gradcam"]])


def test_faithfulness_on_shapes_clips_with_the_c3d(tmp_path: Path) -> None:
    summary = run_eval(tmp_path, "faithfulness", "--dataset", "shapes-clips", "--limit", "2",
                       "--method", "gradcam")
    got = entries(tmp_path)
    world = ShapesWorld(seed=SEED)
    assert [e["action"] for e in got] == [world.clip(i).action for i in range(2)]
    y, o = [e["Y"] for e in got], [e["O"]["gradcam"] for e in got]
    assert all(0 < v <= 1 for v in y + o)
    assert summary["gradcam"] == {"average_drop": average_drop(y, o),
                                  "increase_in_confidence": increase_in_confidence(y, o)}
    assert summary["methods"] == ["gradcam"] and "gradcam++" not in summary


def test_vqa_hat_and_occlusion_summaries_are_mean_rank_correlations(tmp_path: Path) -> None:
    hat = run_eval(tmp_path / "hat", "vqa-hat", "--limit", "1", "--answer", "truth")
    vqa = load_model("shapes-vqa", "random", seed=SEED)
    scene = ShapesWorld(seed=SEED).image(0)
    image = torch.from_numpy(scene.image)[None]
    from mmexplain.tasks.protocols import blurred

    rho = []
    for qa in (q for q in scene.qas if q.answer_refs):  # answers about objects only
        expl = mx.GradCAM(vqa)(image, target=vqa.answer_vocab.index(qa.answer),
                               **vqa.question_context(qa.question))
        rho.append(float(rank_correlation(expl.maps[0, 0], blurred(scene.mask_of(
            qa.answer_refs), 3.0))))
    expected = mean_sem(rho)
    assert hat["gradcam"]["n"] == expected.n
    assert hat["gradcam"]["mean"] == pytest.approx(expected.mean, abs=1e-6)
    assert [e["truth"] for e in entries(tmp_path / "hat")] == [
        q.answer for q in scene.qas if q.answer_refs]

    occ = run_eval(tmp_path / "occ", "occlusion", "--limit", "1", "--method", "gradcam++",
                   "--patch", "16", "--stride", "16")
    values = [e["rho"]["gradcam++"] for e in entries(tmp_path / "occ")]
    assert len(values) == len(scene.qas) and all(-1 <= v <= 1 for v in values)
    assert occ["gradcam++"] == dict(zip(("mean", "sem", "n"), mean_sem(values)))


def test_localization_errors_follow_from_the_recorded_boxes(tmp_path: Path) -> None:
    summary = run_eval(tmp_path, "localization", "--limit", "2", "--method", "gradcam")
    got = entries(tmp_path)
    world = ShapesWorld(seed=SEED)
    for i, e in enumerate(got):  # ground truth: every object's box with its look class
        objects = world.image(i).objects
        assert e["gt_boxes"] == [list(o.bbox) for o in objects]
        assert len(e["classes"]) == 5 and len(e["boxes"]["gradcam"]) == 5
    boxes = [torch.tensor(e["boxes"]["gradcam"]) for e in got]
    labels = [torch.tensor(e["classes"]) for e in got]
    gt = [torch.tensor(e["gt_boxes"]) for e in got]
    gl = [torch.tensor(e["gt_labels"]) for e in got]
    assert summary["gradcam"]["localization_error"] == {
        f"top{k}": pytest.approx(localization_error(boxes, labels, gt, gl, k=k)) for k in (1, 5)}
    assert set(summary["gradcam"]["loc"]) == {"0.0", "0.25", "0.5"}


# --------------------------------------------------------------------------- runs


def test_torchrun_with_two_processes_gives_the_single_process_summary(pointing_run,
                                                                      tmp_path: Path) -> None:
    _, single = pointing_run
    out = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "mmexplain", "eval", "pointing", "--limit", "4", "--weights", "random",
         "--no-progress", "--out", str(out)], env=env, capture_output=True, text=True,
        timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text()) == single
    ids = [[json.loads(ln)["id"] for ln in (out / f"records.rank{r}.jsonl").read_text()
            .splitlines()] for r in (0, 1)]
    assert ids == [["scene0", "scene2"], ["scene1", "scene3"]]
    assert proc.stdout.count('"protocol": "pointing"') == 1  # the summary, printed by rank 0


def test_an_interrupted_run_resumed_gives_the_same_summary(pointing_run, tmp_path: Path,
                                                           capsys) -> None:
    full_out, full = pointing_run
    out = tmp_path / "cut"
    out.mkdir()
    lines = (full_out / "records.rank0.jsonl").read_text().splitlines()
    (out / "records.rank0.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    (out / "settings.json").write_text((full_out / "settings.json").read_text())
    assert run_eval(out, "pointing", "--limit", "4", "--resume") == full
    assert list(read_records(out)) == ["scene0", "scene1", "scene2", "scene3"]  # none twice
    # a resumed run refuses records made with other settings
    capsys.readouterr()
    rc = main(["eval", "pointing", "--limit", "4", "--resume", "--method", "gradcam",
               "--weights", "random", "--no-progress", "--out", str(out)])
    assert rc == 2
    assert "--resume: expected the settings of the run in" in capsys.readouterr().err


# --------------------------------------------------------------------------- real files


def test_coco_pointing_on_the_real_files_records_every_caption_word(tmp_path: Path) -> None:
    instances = shared_file("coco", "instances.json")
    captions = shared_file("coco", "captions.json")
    from mmexplain.data.coco import coco_word_table

    summary = run_eval(tmp_path, "pointing", "--dataset", "coco", "--images",
                       str(instances.parent), "--instances", str(instances), "--captions",
                       str(captions), "--size", "64", "--limit", "2", "--method", "gradcam")
    got = records(tmp_path)
    # --limit 2: the first caption of each image
    assert [(r["id"], r["caption"]) for r in got] == [
        ("397133/0", "A man is in a kitchen making pizzas."),
        ("519208/0", "a man standing next to an elephant next to his trunk")]
    words = [[(e["word"], e["category"], e["present"]) for e in r["entries"]] for r in got]
    assert words == [[("man", "person", True), ("pizzas", "pizza", False)],
                     [("man", "person", True), ("elephant", "elephant", True)]]
    assert all(e["category"] in coco_word_table() for r in got for e in r["entries"])
    assert got[0]["entries"][1]["hit"] is None  # no pizza is annotated: not a pointing trial
    assert summary["gradcam"]["hits"] + summary["gradcam"]["misses"] == 3


def test_densecap_reader_on_the_real_results(tmp_path: Path) -> None:
    results = shared_file("densecap", "results.json")
    from PIL import Image

    from mmexplain.data.densecap import load_densecap

    image = tmp_path / "1.jpg"  # the results' image is not shared: any 720 x 526 picture
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (720, 526, 3), np.uint8)).save(
        image)
    summary = run_eval(tmp_path / "out", "densecap", "--dataset", "densecap", "--results",
                       str(results), "--image", str(image), "--size", "64", "--method",
                       "gradcam")
    top = load_densecap(results)[0].top(5)
    got = entries(tmp_path / "out")
    assert [e["caption"] for e in got] == list(top.captions)
    assert [e["box"] for e in got] == top.boxes((720, 526)).tolist()
    assert summary["gradcam"]["n"] + summary["gradcam"]["undefined"] == 5


def test_vqa_hat_reader_on_the_real_questions(tmp_path: Path) -> None:
    questions = shared_file("vqa", "questions_first100.json")
    annotations = shared_file("vqa", "annotations_first100.json")
    from PIL import Image

    from mmexplain.data.vqa import load_vqa

    first = load_vqa(questions, annotations)[:2]
    (tmp_path / "hat").mkdir()
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for q in first:  # VQA-HAT maps are not shared: make two, in the dataset's naming
        Image.fromarray(rng.integers(0, 255, (14, 14), np.uint8)).save(
            tmp_path / "hat" / f"{q.question_id}_1.png")
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(
            tmp_path / "images" / f"COCO_val2014_{q.image_id:012d}.jpg")
    summary = run_eval(tmp_path / "out", "vqa-hat", "--dataset", "vqa", "--questions",
                       str(questions), "--annotations", str(annotations), "--hat",
                       str(tmp_path / "hat"), "--images", str(tmp_path / "images"), "--size",
                       "64", "--answer", "truth", "--method", "gradcam")
    got = entries(tmp_path / "out")
    assert [(e["question"], e["truth"], e["answer"]) for e in got] == [
        (q.question, q.multiple_choice_answer, q.multiple_choice_answer) for q in first]
    assert summary["gradcam"]["n"] == 2


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv, message", [
    (["pointing", "--dataset", "coco", "--images", "."],
     "--instances: expected a COCO instances JSON (required for this dataset), received "
     "nothing"),
    (["pointing", "--dataset", "coco", "--images", ".", "--instances", "nowhere.json"],
     "--instances: expected an existing file: a COCO instances JSON, received 'nowhere.json', "
     "which does not exist"),
    (["vqa-hat", "--dataset", "vqa", "--questions", "q.json"],
     "--questions: expected an existing file: a VQA v2 questions JSON, received 'q.json'"),
    (["densecap", "--dataset", "densecap"],
     "--results: expected a DenseCap results.json (required for this dataset)"),
    (["faithfulness", "--dataset", "folder", "--images", "no-such-folder"],
     "--images: expected an existing folder: a folder of images, received 'no-such-folder'"),
    (["localization", "--deltas", "0,2"], "--deltas: expected comma-separated thresholds"),
    (["occlusion", "--patch", "100"], "--patch: expected a size in pixels in [1, 64]"),
    (["pointing", "--model", "resnet18", "--limit", "1"],
     "--model: expected a captioner for eval pointing, received 'resnet18'"),
])
def test_bad_arguments_are_named(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    rc = main(["eval", *argv, "--no-progress", "--out", str(tmp_path)])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not any(path.read_text() for path in tmp_path.glob("records*"))


def test_every_protocol_has_help_naming_its_datasets(capsys) -> None:
    from mmexplain.evaluate import PROTOCOLS

    for name, spec in PROTOCOLS.items():
        with pytest.raises(SystemExit) as stop:
            main(["eval", name, "--help"])
        assert stop.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert spec.HELP in text and "{" + ",".join(spec.MODELS) + "}" in text
