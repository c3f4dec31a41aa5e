"""``torchrun --nproc-per-node 2 -m mmexplain video FOLDER`` gives the records of one process:
each rank takes every second video, rank 0 merges the records and writes the index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from mmexplain.cli import main
from mmexplain.runs import read_records

from video_tiny import build, empty_torch_cache, write_video  # noqa: F401 (fixture)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_two_processes_give_the_records_of_one(tmp_path, capsys) -> None:
    folder = build("videomae", tmp_path / "videomae")  # the same weights in every process
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        write_video(videos / f"clip{i}.mp4", 12 + 4 * i, seed=i)
    args = ["video", str(videos), "--weights", str(folder), "--stride", "4"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["torchrun", "--nproc-per-node", "2", "-m", "mmexplain", *args,
                           "--out", str(tmp_path / "two")], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two").glob("records.rank*.jsonl")) == \
        ["records.rank0.jsonl", "records.rank1.jsonl"]
    one, two = read_records(tmp_path / "one"), read_records(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(one) == 3

    def same(record: dict, out: str) -> dict:  # the output paths differ by the --out folder
        return {k: v.replace(out, "OUT") if isinstance(v, str) else v for k, v in record.items()}

    for key in one:
        assert same(one[key], str(tmp_path / "one")) == same(two[key], str(tmp_path / "two"))
        a = np.load(tmp_path / "one" / f"{key}.npz")
        b = np.load(tmp_path / "two" / f"{key}.npz")
        np.testing.assert_allclose(a["frame_maps"], b["frame_maps"], rtol=1e-5, atol=1e-7)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["videos"], summary["frames"]) == (3, 12 + 16 + 20)
    assert (tmp_path / "two" / "index.html").read_text().count("<video") == 3
