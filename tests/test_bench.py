"""scripts/bench.py: its agreement checks on tiny inputs, and its bookkeeping.

The benchmark's timings depend on the machine; what a test can hold it to is
that every contestant runs and that the peers' maps equal mmexplain's where the
peer is right (and differ, flagged, where it is known to be wrong).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from script_module import load_script

from mmexplain.errors import InputError


CASES = ["1-gradcam", "1-gradcam++", "2-shapes", "2-show-tell", "3-shapes", "3-vqa-lstm",
         "4-r3d_18", "4-r3d_18-pp", "4-c3d", "4-sliding", "5-guided", "6-occlusion", "7-vlm",
         "8-folder"]

# (case, peer): the peer computes the same maps as mmexplain, up to float rounding
EXACT = [(case, peer) for case in ("1-gradcam", "2-shapes", "2-show-tell", "3-shapes",
                                   "3-vqa-lstm", "4-r3d_18", "4-c3d")
         for peer in ("captum", "torch-cam")] + [
    ("1-gradcam", "pytorch-grad-cam"), ("2-shapes", "pytorch-grad-cam"),
    ("2-show-tell", "pytorch-grad-cam"), ("3-shapes", "pytorch-grad-cam"),
    ("3-vqa-lstm", "pytorch-grad-cam"), ("5-guided", "captum"), ("6-occlusion", "captum"),
    ("1-gradcam", "mmexplain (hooks)"), ("1-gradcam++", "mmexplain (hooks)")]
# ... and the same once mmexplain's maps are post-processed its way (3-D spline resizing,
# CAM normalised before the guided product)
THEIR_WAY = [("4-r3d_18", "pytorch-grad-cam"), ("4-c3d", "pytorch-grad-cam"),
             ("4-sliding", "pytorch-grad-cam"), ("5-guided", "pytorch-grad-cam")]


def load_bench() -> ModuleType:
    return load_script("bench.py", "mmexplain_bench", register=True)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench()


@pytest.fixture(scope="module")
def run(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory
        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``bench.py --quick --repeat 0`` (warm-up calls only: the maps, no timings) on a
    2-second synthetic clip; -> (returned report, the JSON file read back)."""
    for peer in ("pytorch_grad_cam", "captum", "torchcam"):
        pytest.importorskip(peer, reason="the bench extra: pip install -e '.[bench]'")
    from mmexplain.render import write_mp4

    tmp = tmp_path_factory.mktemp("bench")
    frames = np.full((40, 48, 64, 3), 40, dtype=np.uint8)
    for t in range(40):  # a bright square moving right
        frames[t, 16:32, t:t + 16] = 220
    video = tmp / "square.mp4"
    write_mp4(frames, video, fps=20)
    import cv2  # pytorch-grad-cam's; the benchmark sets its threads too

    threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    try:
        report = bench.main(["--quick", "--repeat", "0", "--no-memory", "--threads", "1",
                             "--video", str(video), "--json", str(tmp / "bench.json")])
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)
    return report, json.loads((tmp / "bench.json").read_text())


def contestants(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(res["key"], c["name"]): c for res in report["results"] for c in res["contestants"]}


def test_every_case_runs_every_contestant_and_the_json_says_so(run) -> None:
    report, written = run
    assert [res["key"] for res in written["results"]] == CASES
    assert written["results"] == json.loads(json.dumps(report["results"], default=str))
    failed = {key: c["error"] for key, c in contestants(written).items() if "error" in c}
    assert failed == {}
    assert not any("skipped" in res for res in written["results"])
    sliding = next(res for res in written["results"] if res["key"] == "4-sliding")
    assert sliding["maps_per_call"] == 2  # 40 frames: two 16-frame windows
    assert written["meta"]["threads"] == 1 and written["meta"]["quick"] is True


def test_peers_that_are_right_give_mmexplains_maps(run) -> None:
    rows = contestants(run[1])
    for key in EXACT:
        agree = rows[key]["agreement"]
        assert agree["pearson_min"] > 0.99999, key
        assert agree["max_abs_diff"] < 1e-4, key
    for key in THEIR_WAY:
        assert rows[key]["agreement"]["pearson_min"] < 0.999, key  # spline / normalisation
        agree = rows[key]["agreement_their_way"]
        assert agree["pearson_min"] > 0.99999, key
        assert agree["max_abs_diff"] < 1e-4, key


def test_known_peer_defects_are_recorded_as_data(run) -> None:
    rows = contestants(run[1])
    for case in ("1-gradcam++", "4-r3d_18-pp"):
        wrong = rows[(case, "torch-cam")]
        assert "denominator is lost" in wrong["known_wrong"]
        # the lost division of eq. 19 shows (a fixed torch-cam release would drop the flag)
        assert wrong["agreement"]["max_abs_diff"] > 0.05
        eps = rows[(case, "pytorch-grad-cam")]
        assert "eps = 1e-6" in eps["note"]
        assert eps["agreement"]["pearson_min"] > 0.99  # close, not equal: its eps


def test_goals_are_judged_on_the_measured_ratios(bench: ModuleType) -> None:
    def res(key: str, row: int, **named: dict[str, Any]) -> dict[str, Any]:
        return {"row": row, "key": key, "contestants": [
            {"name": name, **fields} for name, fields in named.items()]}

    ours = {"kind": "single", "x_floor": 1.04}
    results = [
        res("1-gradcam", 1, mmexplain=ours,
            **{"pytorch-grad-cam": {"kind": "single", "speedup": 2.4}}),
        res("2-show-tell", 2, mmexplain={"kind": "batched"},
            captum={"kind": "repeat", "speedup": 12.0},
            **{"torch-cam": {"kind": "retain_graph", "speedup": 1.4}}),
        res("6-occlusion", 6, mmexplain={"kind": "single"}, captum={"kind": "single"}),
    ]
    judged = [(g["case"], g["goal"], g["met"]) for g in bench.goals(results)]
    assert judged == [
        ("1-gradcam", "x floor <= 1.10", True),
        ("1-gradcam", "vs pytorch-grad-cam >= 2.5x", False),
        ("2-show-tell", "vs captum (repeat) >= 10x", True),
        ("2-show-tell", "vs torch-cam retain_graph >= 1.5x", False),
        ("6-occlusion", "vs captum >= 1x", None),  # not timed (--repeat 0)
    ]
    assert all("ceiling" not in g for g in bench.goals(results))  # no seconds, no ceiling


def test_a_goal_above_the_peers_own_cost_is_bounded_not_missed(bench: ModuleType) -> None:
    """ceiling = the peer's seconds / the row's least work (its fastest 'least work'
    contestant if it has any, else the floor): no implementation is more than that much
    faster."""
    floor = {"name": "floor", "kind": "floor", "seconds": 0.1}
    rows = [
        {"row": 3, "key": "3-vqa-lstm", "contestants": [  # captum 0.7 s = 7x the floor
            floor, {"name": "mmexplain", "kind": "batched", "seconds": 0.11},
            {"name": "captum", "kind": "repeat", "seconds": 0.7, "speedup": 0.7 / 0.11}]},
        {"row": 2, "key": "2-show-tell", "contestants": [  # captum 1.3 s = 13x the floor
            floor, {"name": "mmexplain", "kind": "batched", "seconds": 0.15},
            {"name": "captum", "kind": "repeat", "seconds": 1.3, "speedup": 1.3 / 0.15}]},
        {"row": 5, "key": "5-guided", "contestants": [  # 30x the floor, 2.5x the least work
            floor, {"name": "least work: a", "kind": "least work", "seconds": 1.5},
            {"name": "least work: b", "kind": "least work", "seconds": 1.2},
            {"name": "mmexplain", "kind": "batched", "seconds": 1.3},
            {"name": "captum", "kind": "repeat", "seconds": 3.0, "speedup": 3.0 / 1.3}]},
    ]
    judged = bench.goals(rows)
    assert [(g["case"], g["met"], g["attainable"]) for g in judged] == [
        ("3-vqa-lstm", False, False), ("2-show-tell", False, True), ("5-guided", False, False)]
    assert [round(g["ceiling"], 6) for g in judged] == [7.0, 13.0, 2.5]
    lines = [bench.goal_line(g) for g in judged]
    assert lines[0].split()[0] == "BOUNDED" and "ceiling 7.00x" in lines[0]
    assert lines[1].split()[0] == "MISSED" and "ceiling 13.00x" in lines[1]
    assert lines[2].split()[0] == "BOUNDED" and "ceiling 2.50x" in lines[2]


def test_the_vlm_row_is_judged_against_its_least_work_and_memory(bench: ModuleType) -> None:
    """Row 7 as measured (README): 1.03x the least work (met), 2.67x the per-token loop
    whose own cost is 2.76x the least work (bounded), 173 / 273 MiB (met)."""
    row = {"row": 7, "key": "7-vlm", "contestants": [
        {"name": "floor", "kind": "floor", "seconds": 4.34},
        {"name": "least work", "kind": "least work", "seconds": 72.74, "peak_mib": 273.0},
        {"name": "mmexplain", "kind": "batched", "seconds": 75.26, "peak_mib": 173.0},
        {"name": "per-token loop", "kind": "loop", "seconds": 201.09,
         "speedup": 201.09 / 75.26}]}
    judged = {g["goal"]: g for g in bench.goals([row])}
    assert judged["x least work <= 1.3"]["met"] is True
    assert judged["x least work <= 1.3"]["value"] == pytest.approx(75.26 / 72.74)
    loop = judged["vs per-token loop >= 3.0x"]
    assert loop["met"] is False and loop["attainable"] is False
    assert loop["ceiling"] == pytest.approx(201.09 / 72.74)
    assert bench.goal_line(loop).split()[0] == "BOUNDED"
    memory = judged["peak memory <= 1.5 x (forward + backward)"]
    assert memory["met"] is True and memory["value"] == pytest.approx(173 / 273)


def test_the_folder_row_explains_every_window_of_every_clip_alike_in_each_mode(
        bench: ModuleType, tmp_path: Path) -> None:
    """Row 8 alone (no peers needed): overlapped decoding, decoding in sequence and the
    model alone on windows decoded beforehand give the same maps for every window of the
    folder (2 clips x 32 frames = 4 windows of 16)."""
    threads = torch.get_num_threads()
    try:
        report = bench.main(["--quick", "--repeat", "0", "--no-memory", "--threads", "1",
                             "--rows", "8", "--json", str(tmp_path / "bench.json")])
    finally:
        torch.set_num_threads(threads)
    (res,) = report["results"]
    assert res["key"] == "8-folder" and res["maps_per_call"] == 4
    by = {c["name"]: c for c in res["contestants"]}
    assert set(by) == {"floor", "mmexplain", "sequential"}
    for name in ("floor", "sequential"):
        assert by[name]["agreement"]["max_abs_diff"] < 1e-5, name
        assert by[name]["agreement"]["pearson_min"] > 0.99999, name


def test_the_folder_row_is_judged_against_sequential_and_its_floor(bench: ModuleType) -> None:
    """Row 8's goals: overlapped >= 1.5x sequential (bounded where sequential is itself
    under 1.5x the floor) and within 1.2x of the floor."""
    row = {"row": 8, "key": "8-folder", "contestants": [
        {"name": "floor", "kind": "floor", "seconds": 48.0},
        {"name": "mmexplain", "kind": "batched", "seconds": 51.0, "x_floor": 51.0 / 48.0},
        {"name": "sequential", "kind": "loop", "seconds": 66.0, "speedup": 66.0 / 51.0}]}
    judged = {g["goal"]: g for g in bench.goals([row])}
    versus = judged["vs sequential >= 1.5x"]
    assert versus["met"] is False and versus["attainable"] is False
    assert versus["ceiling"] == pytest.approx(66.0 / 48.0)
    assert bench.goal_line(versus).split()[0] == "BOUNDED"
    assert judged["x floor <= 1.2"]["met"] is True


def test_agreement_normalises_each_map_and_resizes_the_smaller_grid(bench: ModuleType) -> None:
    ramp = torch.arange(16.0).view(1, 4, 4)
    same = bench.agreement(ramp, 3 * ramp + 7)  # affine: equal once normalised
    assert same == {"pearson_min": pytest.approx(1.0), "pearson_mean": pytest.approx(1.0),
                    "max_abs_diff": pytest.approx(0.0, abs=1e-6)}
    flipped = bench.agreement(ramp, ramp.flip(-1).flip(-2))
    assert flipped["pearson_min"] == pytest.approx(-1.0) and flipped["max_abs_diff"] == 1.0
    coarse = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    fine = torch.nn.functional.interpolate(coarse[None], size=(8, 8), mode="bilinear")[0]
    assert bench.agreement(fine, coarse)["max_abs_diff"] == pytest.approx(0.0, abs=1e-6)
    zero = torch.zeros(1, 2, 2)
    assert bench.agreement(zero, zero)["pearson_min"] == 1.0  # constant maps: no NaN


def test_peak_memory_of_a_known_allocation(bench: ModuleType) -> None:
    if not bench.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here: the peak resident size cannot be reset")
    base = bench.status_mib("VmRSS")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
    assert bench.status_mib("VmHWM") - base == pytest.approx(64, abs=4)


def test_bad_arguments_are_named(bench: ModuleType) -> None:
    with pytest.raises(InputError, match=r"--rows: expected comma-separated row numbers from "
                                         r"\[1, 2, 3, 4, 5, 6, 7, 8\], received '1,9'"):
        bench.main(["--rows", "1,9"])
    with pytest.raises(InputError, match=r"--repeat: expected a number of timed calls >= 0, "
                                         r"received -1"):
        bench.main(["--repeat", "-1"])
