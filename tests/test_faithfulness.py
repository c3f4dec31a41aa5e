"""The evaluation literature's measures (issue 19): deletion / insertion (RISE), ROAD, relevance
mass and rank accuracy (CLEVR-XAI), parameter randomisation (Adebayo et al.) -- each against
hand-computed values on tiny cases, then ``mmexplain eval`` end to end on the shapes world,
then cross-checks against Quantus and torch-cam where those are installed."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mmexplain as mx
from mmexplain.cli import main
from mmexplain.errors import InputError
from mmexplain.metrics import (
    curve_auc,
    deletion_curve,
    insertion_curve,
    noisy_linear_imputation,
    perturbation_curve,
    randomizable_layers,
    randomized_models,
    rank_correlation,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    road_curve,
    ssim,
)

PIXELS = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (1, 2, 2): one channel
MAP = torch.tensor([[0.1, 0.4], [0.3, 0.2]])  # order: pixel 2.0, 3.0, 4.0, 1.0
RAMP = torch.arange(9.0).view(1, 3, 3)


def total(x: torch.Tensor) -> torch.Tensor:
    """A score: the sum of the pixels, for one target, (N, 1)."""
    return x.flatten(1).sum(1, keepdim=True)


# --------------------------------------------------------------------------- deletion / insertion


def test_deletion_and_insertion_follow_the_map_most_relevant_first() -> None:
    assert deletion_curve(total, PIXELS, MAP).tolist() == [10, 8, 5, 1, 0]
    assert insertion_curve(total, PIXELS, MAP).tolist() == [0, 2, 5, 9, 10]
    # RISE's auc: trapezoids over 0, 1/4, ..., 1
    assert float(curve_auc(deletion_curve(total, PIXELS, MAP))) == (10 / 2 + 8 + 5 + 1 + 0) / 4
    assert float(curve_auc(torch.tensor([1.0, 0.0]))) == 0.5
    assert float(curve_auc(torch.full((7,), 0.3))) == pytest.approx(0.3)
    # steps: floor(s * L / steps) pixels at step s
    assert deletion_curve(total, PIXELS, MAP, steps=2).tolist() == [10, 5, 0]
    assert deletion_curve(total, PIXELS, MAP, steps=3).tolist() == [10, 8, 5, 0]  # 1, 2, 4


def test_ties_an_all_zero_map_and_a_constant_map_remove_in_raster_order() -> None:
    tied = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    raster = [10, 9, 7, 4, 0]
    assert deletion_curve(total, PIXELS, tied).tolist() == raster
    assert deletion_curve(total, PIXELS, torch.zeros(2, 2)).tolist() == raster
    assert deletion_curve(total, PIXELS, torch.full((2, 2), 3.0)).tolist() == raster
    base = torch.full_like(PIXELS, 10.0)  # a baseline image: deletion puts its pixels in
    assert deletion_curve(total, PIXELS, MAP, baseline=base).tolist() == [10, 18, 25, 31, 40]


def test_k_targets_are_read_each_at_its_own_score_and_batched_as_asked() -> None:
    calls = []

    def two(x: torch.Tensor) -> torch.Tensor:  # target 0: the sum, target 1: twice the sum
        calls.append(len(x))
        s = x.flatten(1).sum(1)
        return torch.stack([s, 2 * s], dim=1)

    maps = torch.stack([MAP, torch.zeros(2, 2)])  # (K=2, 2, 2)
    curves = deletion_curve(two, PIXELS, maps, batch_size=3)
    assert curves.tolist() == [[10, 8, 5, 1, 0], [20, 18, 14, 8, 0]]
    assert calls == [3, 3, 3, 1]  # 2 x 5 copies, 3 per forward
    # extra axes of the score are carried along: (K, steps + 1, 2)
    pair = deletion_curve(lambda x: torch.stack([total(x), -total(x)], -1), PIXELS, MAP[None])
    assert pair[0, :, 1].tolist() == [-10, -8, -5, -1, 0]


def test_cells_of_clips_are_spatiotemporal() -> None:
    clip = torch.arange(1.0, 9.0).view(1, 2, 2, 2)  # (C, T=2, 2, 2): frame sums 10 and 26
    frame_map = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    curve = deletion_curve(total, clip, frame_map, cell=(1, 2, 2), grid_dims=3)
    assert curve.tolist() == [36, 10, 0]  # the relevant frame goes first, whole
    cells = deletion_curve(total, torch.ones(1, 4, 4), torch.eye(4), cell=2)
    assert cells.tolist() == [16, 12, 8, 4, 0]  # 2x2 cells, the diagonal ones first
    with pytest.raises(InputError, match="cell: expected cell sizes that divide"):
        deletion_curve(total, torch.ones(1, 4, 4), torch.eye(4), cell=3)
    with pytest.raises(InputError, match="score: expected a callable returning"):
        deletion_curve(total, PIXELS, torch.stack([MAP, MAP]))  # K=2 maps, one score
    with pytest.raises(InputError, match="mode: expected 'deletion' or 'insertion'"):
        perturbation_curve(total, PIXELS, MAP, mode="both")


# --------------------------------------------------------------------------- ROAD


def test_noisy_linear_imputation_solves_the_neighbour_system() -> None:
    one = torch.zeros(3, 3, dtype=torch.bool)
    one[1, 1] = True  # the mean of its 8 neighbours on a linear ramp: 4
    assert noisy_linear_imputation(RAMP, one, noise=0)[0, 1, 1] == pytest.approx(4.0)
    two = one.clone()
    two[0, 0] = True
    # by hand: 12 x00 ... -> 5 x00 = 8 + x11 (corner: 1/6 + 1/6 + 1/12), 12 x11 = 48 + x00
    out = noisy_linear_imputation(RAMP, two, noise=0)
    assert out[0, 1, 1] == pytest.approx(248 / 59)
    assert out[0, 0, 0] == pytest.approx((8 + 248 / 59) / 5)
    assert torch.equal(out[0][~two], RAMP[0][~two])  # kept pixels are kept
    noisy = noisy_linear_imputation(RAMP, one, noise=0.5, generator=torch.Generator().manual_seed(3))
    noise = 0.5 * torch.randn((1, 1), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert noisy[0, 1, 1] == pytest.approx(4.0 + float(noise))
    # a clip: a frame removed whole is imputed from the frames beside it
    clip = torch.stack([torch.zeros(2, 2), torch.full((2, 2), 3.0)])[None]  # (1, 2, 2, 2)
    gone = torch.zeros(2, 2, 2, dtype=torch.bool)
    gone[0] = True
    assert noisy_linear_imputation(clip, gone, noise=0)[0, 0].tolist() == [[3, 3], [3, 3]]
    with pytest.raises(InputError, match="removed: expected at least one kept pixel"):
        noisy_linear_imputation(RAMP, torch.ones(3, 3, dtype=torch.bool))


def test_road_removes_most_or_least_relevant_pixels_and_imputes_them() -> None:
    mean = lambda x: x.flatten(1).mean(1, keepdim=True)  # noqa: E731
    relevance = RAMP[0]  # the brightest pixel is the most relevant
    morf = road_curve(mean, RAMP, relevance, fractions=[1 / 9], noise=0)
    assert float(morf[0]) == pytest.approx((36 - 8 + (4 / 12 + 5 / 6 + 7 / 6) / (5 / 12)) / 9)
    lerf = road_curve(mean, RAMP, relevance, order="lerf", fractions=[1 / 9], noise=0)
    assert float(lerf[0]) == pytest.approx((36 - 0 + 12 / 5) / 9)  # (1 + 3) / 6 + 4 / 12
    assert road_curve(mean, RAMP, relevance, fractions=[0.5, 0.2], noise=0.1, seed=4).tolist() \
        == road_curve(mean, RAMP, relevance, fractions=[0.5, 0.2], noise=0.1, seed=4).tolist()
    with pytest.raises(InputError, match=r"fractions: expected fractions of the pixels in \(0, 1\)"):
        road_curve(mean, RAMP, relevance, fractions=[1.0])


# --------------------------------------------------------------------------- relevance mass / rank


def test_relevance_mass_accuracy_is_the_share_inside_the_mask() -> None:
    corner = torch.tensor([[1, 0], [0, 0]])
    assert float(relevance_mass_accuracy(MAP, corner)) == pytest.approx(0.1)
    assert float(relevance_mass_accuracy(torch.zeros(2, 2), corner)) == 0.25  # as uniform
    assert float(relevance_mass_accuracy(torch.full((2, 2), 7.0), corner)) == 0.25
    # maps resized to the mask's grid; 3-D grids; leading axes broadcast
    assert float(relevance_mass_accuracy(torch.ones(1, 1), corner)) == 0.25
    clip = torch.zeros(2, 2, 2)
    clip[1] = 1.0
    frame = torch.zeros(2, 2, 2, dtype=torch.bool)
    frame[1, 0] = True
    assert float(relevance_mass_accuracy(clip, frame, grid_dims=3)) == 0.5
    both = relevance_mass_accuracy(torch.stack([MAP, MAP.flip(0)]), corner)
    assert both.tolist() == pytest.approx([0.1, 0.3])
    with pytest.raises(InputError, match="maps: expected non-negative relevance"):
        relevance_mass_accuracy(-MAP, corner)
    with pytest.raises(InputError, match="masks: expected a ground-truth mask with at least one"):
        relevance_mass_accuracy(MAP, torch.zeros(2, 2))


def test_relevance_rank_accuracy_shares_ties_at_the_kth_value() -> None:
    corner = torch.tensor([[1, 0], [0, 0]])
    diagonal = torch.tensor([[1, 0], [0, 1]])
    assert float(relevance_rank_accuracy(MAP, diagonal)) == 0.0  # top 2: 0.4 and 0.3
    assert float(relevance_rank_accuracy(torch.tensor([[0.4, 0.1], [0.3, 0.2]]), diagonal)) == 0.5
    tied = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # K = 1 place, two pixels tied for it
    assert float(relevance_rank_accuracy(tied, corner)) == 0.5
    assert float(relevance_rank_accuracy(torch.zeros(2, 2), corner)) == 0.25  # chance: K / N
    assert float(relevance_rank_accuracy(torch.full((2, 2), 2.0), diagonal)) == 0.5
    two_above = torch.tensor([[3.0, 2.0, 1.0, 1.0, 1.0, 0.0]])  # K = 3: 2 above, 1 of 3 tied
    mask = torch.tensor([[1, 0, 1, 0, 0, 1]])
    assert float(relevance_rank_accuracy(two_above, mask)) == pytest.approx((1 + 1 / 3) / 3)


# --------------------------------------------------------------------------- sanity checks


def test_ssim_equals_the_windowed_formula() -> None:
    a = torch.arange(9.0).view(3, 3)
    b = 8 - a  # one 3x3 window: means 4, sample variances 7.5, covariance -7.5, range 8
    c1, c2 = (0.01 * 8) ** 2, (0.03 * 8) ** 2
    expected = (2 * 16 + c1) * (-15 + c2) / ((32 + c1) * (15 + c2))
    assert float(ssim(a, b, win_size=3)) == pytest.approx(expected)
    assert float(ssim(a, b)) == pytest.approx(expected)  # a 7 window shrinks to the grid
    assert float(ssim(a, a)) == pytest.approx(1.0)
    assert float(ssim(torch.ones(4, 4), torch.ones(4, 4))) == 1.0  # equal constants
    assert float(ssim(torch.zeros(3, 3), torch.zeros(3, 3))) == 1.0
    assert float(ssim(torch.zeros(3, 3), torch.ones(3, 3), win_size=3)) == pytest.approx(
        (0.01 ** 2) / (1 + 0.01 ** 2))  # the means' term alone, range 1


def test_randomisation_changes_copies_top_first_and_never_the_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert randomizable_layers(model) == ["2", "0"]
    changed = []
    for name, copy in randomized_models(model, mode="cascading", seed=5):
        changed.append([not torch.equal(copy.state_dict()[f"{n}.weight"], before[f"{n}.weight"])
                        for n in ("0", "2")])
    assert changed == [[False, True], [True, True]]  # cascading: top layer, then also below
    independent = [[not torch.equal(c.state_dict()[f"{n}.weight"], before[f"{n}.weight"])
                    for n in ("0", "2")] for _, c in randomized_models(model, mode="independent")]
    assert independent == [[False, True], [True, False]]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG as it was
    with pytest.raises(InputError, match="layers: expected names of the model's layers"):
        list(randomized_models(model, layers=["1"]))  # a ReLU has no parameters


# --------------------------------------------------------------------------- mmexplain eval

SEED = 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_eval(out: Path, *argv: str) -> dict:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["eval", *argv, "--weights", "random", "--no-progress", "--out", str(out)])
    assert rc == 0
    return json.loads((out / "summary.json").read_text())


def entries(out: Path) -> list[dict]:
    return [e for path in sorted(out.glob("records.rank*.jsonl"))
            for line in path.read_text().splitlines() for e in json.loads(line)["entries"]]


@pytest.fixture(scope="module")
def vqa():
    from mmexplain.evaluate import load_model

    return load_model("shapes-vqa", "random", seed=SEED).eval()


@pytest.fixture(scope="module")
def scene():
    from mmexplain.data.shapes import ShapesWorld

    return ShapesWorld(seed=SEED).image(0)


def test_eval_deletion_records_the_confidence_after_each_step(tmp_path: Path, vqa, scene
                                                              ) -> None:
    summary = run_eval(tmp_path, "deletion", "--limit", "1", "--steps", "4", "--method",
                       "gradcam")
    got = entries(tmp_path)
    assert [e["question"] for e in got] == [qa.question for qa in scene.qas]
    image = torch.from_numpy(scene.image)[None]
    qa = scene.qas[0]
    context = vqa.question_context(qa.question)
    with torch.no_grad():
        answer = int(vqa(image, **context).softmax(1)[0].argmax())
    maps = mx.GradCAM(vqa)(image, target=answer, **context).maps[0]  # (1, h, w)

    def confidence(x: torch.Tensor) -> torch.Tensor:
        rows = {k: v.expand(len(x), *v.shape[1:]) for k, v in context.items()}
        return vqa(x, **rows).softmax(1)[:, [answer]]

    curve = deletion_curve(confidence, image[0], maps.clamp(min=0), steps=4)[0]
    assert got[0]["class"] == answer and got[0]["answer"] == vqa.answer_vocab.itos[answer]
    assert got[0]["curve"]["gradcam"] == pytest.approx(curve.tolist(), abs=1e-6)
    assert got[0]["auc"]["gradcam"] == pytest.approx(float(curve_auc(curve)), abs=1e-6)
    aucs = [e["auc"]["gradcam"] for e in got]
    assert summary["gradcam"]["auc"]["mean"] == pytest.approx(float(np.mean(aucs)))
    assert summary["gradcam"]["auc"]["n"] == len(scene.qas)


def test_eval_road_and_relevance_on_vqa_resume_where_they_stopped(tmp_path: Path, scene
                                                                 ) -> None:
    road = run_eval(tmp_path / "road", "road", "--limit", "1", "--fractions", "0.5",
                    "--method", "gradcam")
    got = entries(tmp_path / "road")
    assert road["fractions"] == [0.5] and len(got) == len(scene.qas)
    assert road["gradcam"]["morf"] == pytest.approx([np.mean([e["morf"]["gradcam"][0]
                                                              for e in got])])
    assert road["gradcam"]["gap"] == pytest.approx(road["gradcam"]["lerf_area"]
                                                   - road["gradcam"]["morf_area"])
    rel = tmp_path / "relevance"
    run_eval(rel, "relevance", "--limit", "1", "--method", "gradcam,eigencam")
    first = (rel / "records.rank0.jsonl").read_text()
    summary = run_eval(rel, "relevance", "--limit", "2", "--method", "gradcam,eigencam",
                       "--resume")
    assert (rel / "records.rank0.jsonl").read_text().startswith(first)  # scene0 kept, not redone
    got = entries(rel)
    assert [e["question"] for e in got][:len([q for q in scene.qas if q.answer_refs])] == [
        q.question for q in scene.qas if q.answer_refs]  # questions about objects only
    for m in ("gradcam", "eigencam"):
        assert summary[m]["mass"]["mean"] == pytest.approx(np.mean([e["mass"][m] for e in got]))
        assert all(0 <= e["rank"][m] <= 1 for e in got)


def test_eval_sanity_on_clips_gradient_maps_change_eigencam_only_below_its_layer(
        tmp_path: Path) -> None:
    """The C3D's maps are at conv3b: randomising fc8 changes every gradient map, but not
    Eigen-CAM's, which reads the activations alone (Adebayo et al.'s insensitivity, in the
    method built to show it); randomising conv3b itself changes both."""
    summary = run_eval(tmp_path, "sanity", "--dataset", "shapes-clips", "--limit", "1",
                       "--method", "gradcam,eigencam", "--layers", "model.fc8,model.conv3b.0",
                       "--randomization", "cascading", "--guided")
    (entry,) = entries(tmp_path)
    assert entry["layers"] == summary["layers"] == ["model.fc8", "model.conv3b.0"]
    grad, eigen = (entry["cascading"][m] for m in ("gradcam", "eigencam"))
    assert eigen["rho"][0] == pytest.approx(1.0) and eigen["ssim"][0] == pytest.approx(1.0)
    assert grad["rho"][0] < 0.99 and eigen["rho"][1] < 0.99
    assert summary["gradcam"]["cascading"]["rho"] == pytest.approx(grad["rho"])
    assert "independent" not in summary["gradcam"]
    # Guided Backprop: |input gradient| summed over colours, trained vs fc8 randomised
    from mmexplain.data.shapes import ShapesWorld
    from mmexplain.evaluate import load_model
    from mmexplain.guided import GuidedBackprop
    from mmexplain.metrics import rank_correlation

    c3d = load_model("shapes-c3d", "random", seed=SEED)
    (_, top), = list(randomized_models(c3d, layers=["model.fc8"], seed=SEED))
    clip = torch.from_numpy(ShapesWorld(seed=SEED).clip(0).video)[None]
    x = (clip - torch.tensor(c3d.preprocess.mean).view(1, 3, 1, 1, 1)) / torch.tensor(
        c3d.preprocess.std).view(1, 3, 1, 1, 1)
    maps = [GuidedBackprop(m)(x, target=entry["class"])[0, 0].abs().sum(0) for m in (c3d, top)]
    assert entry["cascading"]["guided-backprop"]["rho"][0] == pytest.approx(
        float(rank_correlation(maps[1], maps[0], grid_dims=3)), abs=1e-6)
    assert summary["guided-backprop"]["cascading"]["rho"] == pytest.approx(
        entry["cascading"]["guided-backprop"]["rho"])


def test_eval_insertion_on_clips_starts_blurred_and_ends_at_the_clip(tmp_path: Path) -> None:
    from mmexplain.data.shapes import ShapesWorld
    from mmexplain.evaluate import load_model
    from mmexplain.metrics import blurred_input
    from mmexplain.tasks.protocols import ClassTask

    summary = run_eval(tmp_path, "insertion", "--dataset", "shapes-clips", "--limit", "1",
                       "--steps", "2", "--cell", "1,8,8", "--method", "gradcam")
    (entry,) = entries(tmp_path)
    clip = torch.from_numpy(ShapesWorld(seed=SEED).clip(0).video)[None]  # (1, 3, T, H, W)
    task = ClassTask(load_model("shapes-c3d", "random", seed=SEED))
    with torch.no_grad():
        blurred = task.confidences(task.model_input(blurred_input(clip, grid_dims=3)))
    curve = entry["curve"]["gradcam"]
    assert len(curve) == 3 and entry["action"] == ShapesWorld(seed=SEED).clip(0).action
    assert curve[0] == pytest.approx(float(blurred[entry["class"]]), abs=1e-6)  # nothing in yet
    assert curve[-1] == pytest.approx(entry["Y"], abs=1e-6)  # everything in: the clip itself
    assert summary["gradcam"]["curve"] == pytest.approx(curve)


def test_eval_relevance_of_caption_words_against_the_objects_they_name(tmp_path: Path,
                                                                       scene) -> None:
    from mmexplain.evaluate import load_model
    from mmexplain.tasks.caption import WordLogProbs

    run_eval(tmp_path, "relevance", "--model", "shapes-captioner", "--limit", "1", "--method",
             "gradcam")
    got = entries(tmp_path)
    positions = [i for i, refs in enumerate(scene.caption.refs) if refs]
    assert [e["word"] for e in got] == [scene.caption.tokens[p] for p in positions]
    captioner = load_model("shapes-captioner", "random", seed=SEED)
    tokens = captioner.caption_context([list(scene.caption.tokens)])["tokens"]
    maps = mx.GradCAM(captioner)(torch.from_numpy(scene.image)[None],
                                 target=WordLogProbs(positions), tokens=tokens).maps[0]
    masks = torch.from_numpy(np.stack([scene.mask_of(scene.caption.refs[p]) for p in positions]))
    assert [e["mass"]["gradcam"] for e in got] == pytest.approx(
        relevance_mass_accuracy(maps.clamp(min=0), masks).tolist(), abs=1e-6)
    assert [e["rank"]["gradcam"] for e in got] == pytest.approx(
        relevance_rank_accuracy(maps.clamp(min=0), masks).tolist(), abs=1e-6)


def test_eval_relevance_on_coco_scores_every_category_against_its_masks(tmp_path: Path
                                                                       ) -> None:
    from conftest import shared_file

    from mmexplain.data.coco import CocoAnnotations
    from mmexplain.data.images import image_pixels, read_image
    from mmexplain.evaluate import load_model

    instances = shared_file("coco", "instances.json")
    summary = run_eval(tmp_path, "relevance", "--dataset", "coco", "--images",
                       str(instances.parent), "--instances", str(instances), "--size", "64",
                       "--limit", "1", "--method", "gradcam")
    coco = CocoAnnotations(instances, image_dir=instances.parent)
    image_id = [i for i in coco.image_ids() if coco.annotations(i)][0]
    masks = coco.category_masks(image_id)
    got = entries(tmp_path)
    assert [e["category"] for e in got] == list(masks)
    ids = sorted(coco.category_names())
    model = load_model("resnet18", "random", seed=SEED, num_classes=len(ids))
    first = list(masks)[0]
    cls = ids.index({n: c for c, n in coco.category_names().items()}[first])
    from mmexplain.tasks.protocols import ClassTask

    task = ClassTask(model)
    x = task.model_input(image_pixels(read_image(str(coco.image_path(image_id))), 64))
    maps = mx.GradCAM(model)(x, target=cls).maps[0].clamp(min=0)
    assert got[0]["mass"]["gradcam"] == pytest.approx(
        float(relevance_mass_accuracy(maps, masks[first])), abs=1e-6)
    assert summary["gradcam"]["rank"]["n"] == len(masks)


def test_eval_deletion_on_a_video_list_starts_at_the_clip_confidence(tmp_path: Path) -> None:
    from conftest import shared_file

    video = shared_file("video", "armwrestling.mp4")
    listing = tmp_path / "videos.csv"
    listing.write_text(f"path,label\n{video},arm wrestling\n")
    summary = run_eval(tmp_path / "out", "deletion", "--dataset", "videos", "--videos",
                       str(listing), "--size", "64", "--steps", "2", "--method", "gradcam")
    (entry,) = entries(tmp_path / "out")
    assert entry["label"] == "arm wrestling" and summary["model"] == "r3d_18"
    curve = entry["curve"]["gradcam"]  # the batched scorer agrees with the single forward
    assert len(curve) == 3 and curve[0] == pytest.approx(entry["Y"], abs=1e-6)


def test_eval_relevance_under_torchrun_gives_the_single_process_summary(tmp_path: Path
                                                                         ) -> None:
    import os
    import subprocess
    import sys

    argv = ["relevance", "--limit", "2", "--method", "gradcam", "--weights", "random",
            "--no-progress"]
    single = run_eval(tmp_path / "one", *argv[:-3])
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "mmexplain", "eval", *argv, "--out", str(tmp_path / "two")], env=env,
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text()) == single
    ids = [[json.loads(ln)["id"] for ln in (tmp_path / "two" / f"records.rank{r}.jsonl")
            .read_text().splitlines()] for r in (0, 1)]
    assert ids == [["scene0"], ["scene1"]]


@pytest.mark.parametrize("argv, message", [
    (["road", "--fractions", "0,0.5"], "--fractions: expected comma-separated fractions in (0, 1)"),
    (["deletion", "--cell", "0"], "--cell: expected a positive number of pixels"),
    (["sanity", "--layers", "nowhere", "--limit", "1"], "layers: expected names of the model's"),
])
def test_bad_arguments_of_the_new_protocols_are_named(argv, message, tmp_path: Path,
                                                      capsys) -> None:
    rc = main(["eval", *argv, "--weights", "random", "--no-progress", "--out", str(tmp_path)])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_the_readme_commands_of_the_new_protocols_parse() -> None:
    """Every ``mmexplain eval`` line of the README's section on these measures names
    options the command has (parsed, not run)."""
    import shlex

    from mmexplain.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Faithfulness and sanity: the evaluation literature")[1]
    section = section.split("\n## ")[0]
    blocks = [b.split("```")[0] for b in section.split("```bash")[1:]]
    lines = [ln.split("  #")[0] for b in blocks for ln in b.splitlines()
             if ln.startswith("mmexplain eval")]
    assert {shlex.split(ln)[2] for ln in lines} == {"deletion", "insertion", "road",
                                                     "relevance", "sanity"}
    parser = build_parser()
    for line in lines:
        args = parser.parse_args(shlex.split(line)[1:])
        assert args.protocol == shlex.split(line)[2]


# --------------------------------------------------------------------------- peers


def test_relevance_and_randomisation_measures_equal_quantus() -> None:
    """Quantus (0.6) on the same maps: relevance mass and rank accuracy (maps without ties:
    Quantus breaks ties by position, mmexplain shares them), Spearman and SSIM similarity,
    and ROAD's noisy linear imputation without noise."""
    quantus = pytest.importorskip("quantus")
    from quantus.functions import perturb_func, similarity_func

    rng = np.random.default_rng(0)
    a = rng.random((1, 1, 8, 8)).astype(np.float32)
    s = np.zeros((1, 1, 8, 8), dtype=np.float32)
    s[..., 2:5, 3:7] = 1
    for metric, ours in ((quantus.RelevanceMassAccuracy, relevance_mass_accuracy),
                         (quantus.RelevanceRankAccuracy, relevance_rank_accuracy)):
        theirs = metric(disable_warnings=True).evaluate_batch(a_batch=a, s_batch=s)[0]
        assert float(ours(torch.from_numpy(a[0, 0]), torch.from_numpy(s[0, 0]))) == \
            pytest.approx(theirs, abs=1e-6)
    b = rng.random((8, 8))
    from mmexplain.metrics import rank_correlation

    assert float(rank_correlation(torch.from_numpy(a[0, 0]), torch.from_numpy(b))) == \
        pytest.approx(similarity_func.correlation_spearman(a[0, 0].ravel(), b.ravel()), abs=1e-6)
    assert float(ssim(torch.from_numpy(a[0, 0]).double(), torch.from_numpy(b))) == \
        pytest.approx(similarity_func.ssim(a[0, 0].astype(np.float64), b), abs=1e-6)
    img = rng.random((3, 8, 8))
    removed = np.zeros(64, dtype=bool)
    removed[[9, 10, 27, 40]] = True
    theirs = perturb_func.noisy_linear_imputation(arr=img, indices=np.flatnonzero(removed),
                                                  noise=0.0)
    ours = noisy_linear_imputation(torch.from_numpy(img), torch.from_numpy(removed).view(8, 8),
                                   noise=0)
    assert ours.numpy() == pytest.approx(theirs, abs=1e-6)


def test_road_accuracy_equals_quantus_road() -> None:
    """Quantus's ROAD (0.6) end to end on one grey 8 x 8 input (Quantus ranks the map
    broadcast over the channels but imputes pixel indices, so one channel is where the two
    read the same), without noise, at fractions where round and floor of p * 64 agree;
    the score is ROAD's: is the class still the prediction."""
    quantus = pytest.importorskip("quantus")
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(256, 3)).eval()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 1, 8, 8)).astype(np.float32)
    a = rng.random((8, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    road = quantus.ROAD(noise=0.0, percentages=[25, 50, 75], disable_warnings=True)
    theirs = road(model=model, x_batch=x, y_batch=y, a_batch=a, channel_first=True,
                  device="cpu")
    ours = []
    for xi, ai, yi in zip(x, a, y):
        def kept(batch: torch.Tensor, cls: int = int(yi)) -> torch.Tensor:
            return (model(batch.float()).argmax(1) == cls).double()[:, None]

        ours.append(road_curve(kept, torch.from_numpy(xi).double(), torch.from_numpy(ai[0]),
                               fractions=[0.25, 0.5, 0.75], noise=0))
    accuracy = torch.stack(ours).mean(0)  # measured: 0.625, 0.5, 0.5 -- inputs do flip
    assert accuracy.tolist() == pytest.approx([theirs[p] for p in (25, 50, 75)])
    assert accuracy.tolist() != [1.0, 1.0, 1.0]


def test_randomised_copies_equal_quantus_layer_generator() -> None:
    """Quantus's model parameter randomisation (0.6, ``get_random_layer_generator``): the same
    layers, re-initialised with the same seed, give the same weights, cascading (Quantus's
    "top_down") and independently (Quantus goes bottom up there; each layer alone is the
    same)."""
    pytest.importorskip("quantus")
    from quantus.helpers.model.pytorch_model import PyTorchModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    peer = PyTorchModel(model, channel_first=True, softmax=False, device="cpu")

    def states(pairs) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in pairs}

    for ours_mode, their_order in (("cascading", "top_down"), ("independent", "independent")):
        ours = states(randomized_models(model, mode=ours_mode, seed=42))
        theirs = states(peer.get_random_layer_generator(order=their_order, seed=42))
        assert set(ours) == set(theirs) == {"0", "3"}
        for name in ours:
            assert all(torch.equal(ours[name][k], theirs[name][k]) for k in ours[name])


def test_deletion_and_insertion_auc_equal_torch_cam() -> None:
    """torch-cam's ``DeletionInsertionMetric`` (0.5) on the same model, input and map.

    Where the definitions coincide: positions ranked by the map (stable descending sort:
    ties in raster order in both), the class's softmax probability, zeros replacing
    pixels, AUC by trapezoids over the fraction perturbed. Where they differ, the test
    makes them agree: torch-cam's insertion starts from zeros (RISE, and mmexplain's
    default, from the blurred input: compared here with ``baseline=0``); torch-cam steps
    ceil(L / steps) positions, mmexplain floor(s L / steps) (equal when steps divide L:
    256 pixels, 16 steps); torch-cam resizes its CAM in float32 (the target layer keeps
    the input's 16 x 16, so neither resizes).
    """
    metrics = pytest.importorskip("torchcam.metrics")
    from functools import partial

    from torchcam.methods import GradCAM as PeerGradCAM

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 5)).eval()
    x = torch.rand(1, 3, 16, 16)
    extractor = PeerGradCAM(model, target_layer="0")
    try:
        metric = metrics.DeletionInsertionMetric(extractor, partial(torch.softmax, dim=-1),
                                                 steps=16, batch_size=8)
        metric.update(x)
        theirs = metric.summary()
        scores = model(x).softmax(-1)  # torch-cam explains the score after its logits_fn
        cls = int(scores.argmax())
        cam = extractor.fuse_cams(extractor(cls, scores)).detach()  # (1, 16, 16): its map
    finally:
        extractor.remove_hooks()

    def prob(batch: torch.Tensor) -> torch.Tensor:
        return model(batch).softmax(1)[:, [cls]]

    for mode in ("deletion", "insertion"):
        ours = perturbation_curve(prob, x[0], cam, mode=mode, steps=16, baseline=0.0)[0]
        assert float(curve_auc(ours)) == pytest.approx(theirs[f"{mode}_auc"], abs=1e-6)


# --------------------------------------------------------------------------- figures of the summaries


def test_eval_deletion_writes_the_mean_curves_of_the_records_as_its_figure(tmp_path: Path
                                                                           ) -> None:
    import base64

    from PIL import Image

    from mmexplain.evaluate import summary_figures
    from mmexplain.plots import figure_png

    summary = run_eval(tmp_path, "deletion", "--limit", "1", "--steps", "3", "--cell", "8")
    got = entries(tmp_path)
    assert summary["figures"] == ["deletion_curves.png"]
    assert json.loads((tmp_path / "summary.json").read_text())["figures"] == summary["figures"]
    fig = summary_figures(summary)["deletion_curves"]
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == [
        f"Grad-CAM (AUC {summary['gradcam']['auc']['mean']:.3f})",
        f"Grad-CAM++ (AUC {summary['gradcam++']['auc']['mean']:.3f})"]
    for line, m in zip(lines, ("gradcam", "gradcam++")):
        mean_curve = np.mean([e["curve"][m] for e in got], axis=0)  # the records' curves
        np.testing.assert_allclose(line.get_ydata(), mean_curve, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(line.get_ydata(), summary[m]["curve"])
        np.testing.assert_array_equal(line.get_xdata(), [0, 1 / 3, 2 / 3, 1])
    png = (tmp_path / "deletion_curves.png").read_bytes()
    assert png == figure_png(fig)  # the file is this figure
    assert Image.open(tmp_path / "deletion_curves.png").size == (640, 420)
    assert base64.b64encode(png).decode() in (tmp_path / "summary.html").read_text()


def test_eval_sanity_writes_its_correlations_and_the_panel_of_its_first_input(tmp_path: Path
                                                                              ) -> None:
    from mmexplain.cli import build_parser
    from mmexplain.evaluate import PROTOCOLS, _sanity_panel, summary_figures
    from mmexplain.plots import figure_png

    argv = ["sanity", "--limit", "1", "--method", "gradcam,gradcam++", "--layers",
            "model.classifier.4,model.classifier.1", "--randomization", "cascading", "--guided"]
    summary = run_eval(tmp_path, *argv)
    (entry,) = entries(tmp_path)
    assert summary["figures"] == ["sanity_cascading.png", "sanity_panel.png"]
    lines = summary_figures(summary)["sanity_cascading"].axes[0].get_lines()
    assert [line.get_label() for line in lines[:3]] == ["Grad-CAM", "Grad-CAM++", "Guided Backprop"]
    for line, m in zip(lines, ("gradcam", "gradcam++", "guided-backprop")):
        np.testing.assert_array_equal(line.get_ydata(), entry["cascading"][m]["rho"])
    assert list(lines[3].get_ydata()) == [0.5, 0.5]  # the sanity bar
    # the panel: the first input again, with its maps; its correlations are the record's
    args = build_parser().parse_args(["eval", *argv, "--weights", "random"])
    args.model = "shapes-vqa"
    example = PROTOCOLS["sanity"].plan(args, ("gradcam", "gradcam++")).example()
    maps = example["maps"]["cascading"]
    for m in ("gradcam", "gradcam++", "guided-backprop"):
        assert example["cascading"][m]["rho"] == pytest.approx(entry["cascading"][m]["rho"],
                                                               abs=1e-9)
        assert len(maps[m]) == 3  # trained, then after each layer
        rho = [float(rank_correlation(r, maps[m][0], grid_dims=2)) for r in maps[m][1:]]
        assert rho == pytest.approx(entry["cascading"][m]["rho"], abs=1e-9)
    panel = _sanity_panel(example)
    assert [ax.get_title() for ax in panel.axes[:3]] == ["trained"] + [
        f"{layer}\nρ = {r:.2f}" for layer, r in zip(["classifier.4", "classifier.1"],
                                                    entry["cascading"]["gradcam"]["rho"])]
    assert (tmp_path / "sanity_panel.png").read_bytes() == figure_png(panel)


# --------------------------------------------------------------------------- the sanity finding


def test_gradcampp_maps_are_a_positive_mix_of_the_activations_that_a_random_head_keeps(
        monkeypatch) -> None:
    """Why Grad-CAM++ fails the sanity bar on the shipped models (issue 19, as measured).

    Its channel weights w_k = sum_ij alpha_ij relu(dS/dA_ij) (eq. 19-20) are never negative,
    and with 16 x 16 positions every channel has some positive gradient: all 64 weights are
    > 0. Its map is then a positive mix of the layer's activations, and *any* positive
    weights give nearly the same map (random ones: mean rank correlation 0.71-0.90 on
    these scenes), while signed weights and the ReLU, Grad-CAM's regime, give another map
    each time (0.12-0.20). Randomising the layers above the explained one changes the
    gradients only (the activations stay bit-identical), so Grad-CAM++'s map keeps its
    layout until conv3, the explained layer, is itself randomised. Saturation is not the
    cause: s * g stays far below 2 (alpha ~ 1/2). The softmax form (eq. 22-24), whose
    alpha can be negative, weights about a third of the channels negatively on these
    scenes, and it does fall below 0.5 at the first layer (README, as measured)."""
    from mmexplain.data.shapes import ShapesWorld
    from mmexplain.evaluate import load_model
    from mmexplain.methods import gradcampp
    from mmexplain.tasks import protocols as P

    vqa = load_model("shapes-vqa", seed=SEED)  # the shipped, trained weights
    assert "checkpoint" in vqa.weights_source or "file" in vqa.weights_source
    seen: dict[str, torch.Tensor] = {}
    spied = gradcampp.gradcam_pp_weights

    def spy(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        seen["acts"], seen["grads"] = acts.detach(), grads.detach()
        return spied(acts, grads)

    monkeypatch.setattr(gradcampp, "gradcam_pp_weights", spy)
    softmax_weights = gradcampp.gradcam_pp_softmax_weights
    monkeypatch.setattr(gradcampp, "gradcam_pp_softmax_weights",
                        lambda *a: seen.setdefault("softmax", softmax_weights(*a)))
    gen = torch.Generator().manual_seed(0)
    world = ShapesWorld(seed=SEED)
    for index, (pos_floor, signed_ceiling) in enumerate([(0.65, 0.3), (0.85, 0.3), (0.7, 0.3)]):
        sample = world.image(index)
        _, task, _ = P._shapes_tasks(vqa, sample, first=True)[0]
        x, cls, _ = P._predicted(task, P.scene_pixels(sample))
        gcpp = P.explain(task, x, [cls], "gradcam++")[0]
        acts, grads = seen["acts"][0], seen["grads"][0]  # (64, 16, 16) at conv3
        w = spied(acts[None], grads[None])[0]
        assert acts.shape == (64, 16, 16) and float(acts.min()) >= 0 and float(w.min()) > 0

        def mix(weights: torch.Tensor) -> torch.Tensor:
            return torch.relu((weights.view(-1, 1, 1) * acts).sum(0))

        np.testing.assert_allclose(gcpp, torch.nn.functional.interpolate(
            mix(w)[None, None], size=gcpp.shape, mode="bilinear", align_corners=False)[0, 0],
            rtol=1e-4, atol=1e-6 * float(gcpp.max()))

        def rho(weights: torch.Tensor) -> float:
            return float(rank_correlation(mix(weights), mix(w), grid_dims=2))

        positive = np.mean([rho(torch.rand(64, generator=gen)) for _ in range(20)])
        signed = np.mean([rho(torch.randn(64, generator=gen)) for _ in range(20)])
        assert positive > pos_floor and signed < signed_ceiling, (index, positive, signed)
        s_g = (acts.sum(dim=(1, 2)).view(-1, 1, 1) * grads)[grads > 0]
        assert float(s_g.median()) < 1.0  # alpha = 1 / (2 + s g) ~ 1/2: not saturated
        # the head randomised (cascade step 1): the activations are the same tensors' values
        (_, top), = list(randomized_models(vqa, layers=["model.classifier.4"], seed=SEED))
        randomized = copy.copy(task)
        randomized.adapter = top
        P.explain(randomized, x, [cls], "gradcam++")
        assert torch.equal(seen["acts"][0], acts) and not torch.equal(seen["grads"][0], grads)
        assert float(spied(seen["acts"], seen["grads"]).min()) > 0  # still a positive mix
        # the softmax form (eq. 22-24): alpha can be negative, so can weights: a signed mix
        seen.pop("softmax", None)
        P.explain(task, x, [cls], "gradcam++", form="softmax")
        assert int((seen["softmax"] < 0).sum()) >= 15  # 21, 19, 19 of the 64 channels


def test_faithfulness_road_and_relevance_summaries_become_bars_of_their_numbers() -> None:
    from mmexplain.evaluate import summary_figures

    base = {"dataset": "shapes", "model": "shapes-vqa", "entries": 3}
    faith = {**base, "protocol": "faithfulness", "methods": ["gradcam", "gradcam++"],
             "gradcam": {"average_drop": 46.5, "increase_in_confidence": 13.4, "win": 38.0},
             "gradcam++": {"average_drop": 36.8, "increase_in_confidence": 17.1, "win": 62.0}}
    ax = summary_figures(faith)["faithfulness_bars"].axes[0]
    assert [p.get_height() for p in ax.patches] == [46.5, 13.4, 38.0, 36.8, 17.1, 62.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "Average Drop %", "Increase in Confidence %", "Win %"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Grad-CAM", "Grad-CAM++"]
    one = {**base, "protocol": "faithfulness", "methods": ["eigencam"],
           "eigencam": {"average_drop": 60.0, "increase_in_confidence": 5.0}}  # no Win % alone
    ax = summary_figures(one)["faithfulness_bars"].axes[0]
    assert [p.get_height() for p in ax.patches] == [60.0, 5.0]
    assert [t.get_text() for t in ax.texts] == ["n/a"]
    rel = {**base, "protocol": "relevance", "methods": ["gradcam"],
           "gradcam": {"mass": {"mean": 0.29, "sem": 0.01, "n": 3},
                       "rank": {"mean": 0.66, "sem": 0.02, "n": 3}}}
    ax = summary_figures(rel)["relevance_bars"].axes[0]
    assert [p.get_height() for p in ax.patches] == [0.29, 0.66]
    road = {**base, "protocol": "road", "methods": ["gradcam"], "fractions": [0.5],
            "gradcam": {"morf_area": 0.25, "lerf_area": 0.87, "gap": 0.62}}
    ax = summary_figures(road)["road_bars"].axes[0]
    assert [p.get_height() for p in ax.patches] == [0.25, 0.87, 0.62]
    empty = {**base, "entries": 0, "protocol": "faithfulness", "methods": ["gradcam"],
             "gradcam": None}
    assert summary_figures(empty) == {}  # nothing measured, no figure


def test_eval_sanity_with_form_softmax_randomises_gradcampp_of_eq_22_24(tmp_path: Path, vqa,
                                                                        scene) -> None:
    """--form softmax: Grad-CAM++ explains the class probability (eq. 22-24), whose alpha
    and so weights can be negative; methods without a form run as always."""
    summary = run_eval(tmp_path, "sanity", "--limit", "1", "--method", "gradcam,gradcam++",
                       "--layers", "model.classifier.4", "--randomization", "cascading",
                       "--form", "softmax")
    from mmexplain.engine import make_cam

    (entry,) = entries(tmp_path)
    assert json.loads((tmp_path / "settings.json").read_text())["form"] == "softmax"
    image = torch.from_numpy(scene.image)[None]
    context = vqa.question_context(scene.qas[0].question)
    (_, top), = list(randomized_models(vqa, layers=["model.classifier.4"], seed=SEED))

    def rho(method: str, **options) -> float:
        a, b = (make_cam(m, method, **options)(image, target=entry["class"], **context)
                .upsample(tuple(image.shape[2:])).maps[0, 0].clamp(min=0) for m in (vqa, top))
        return float(rank_correlation(b, a, grid_dims=2))

    softmax = rho("gradcam++", form="softmax")
    assert entry["cascading"]["gradcam++"]["rho"] == [pytest.approx(softmax, abs=1e-6)]
    assert abs(softmax - rho("gradcam++")) > 1e-3  # not the exponential form's number
    assert entry["cascading"]["gradcam"]["rho"] == [pytest.approx(rho("gradcam"), abs=1e-6)]
    assert summary["gradcam++"]["cascading"]["rho"] == entry["cascading"]["gradcam++"]["rho"]
