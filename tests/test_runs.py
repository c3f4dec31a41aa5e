"""Dataset runs: records per item, resume after an interruption, sharding over torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmexplain.errors import InputError
from mmexplain.runs import read_records, run_items

ITEMS = [{"id": f"item{i}", "value": i} for i in range(7)]
calls: list[str] = []


def evaluate(item: dict) -> dict:
    calls.append(item["id"])
    return {"square": item["value"] ** 2}


def summarize(records: list[dict]) -> dict:
    return {"sum": sum(r["square"] for r in records), "order": [r["id"] for r in records]}


def test_records_are_written_per_item_and_summarised(tmp_path: Path) -> None:
    calls.clear()
    summary = run_items(ITEMS, evaluate, summarize, tmp_path)
    assert summary == {"items": 7, "sum": sum(i * i for i in range(7)),
                       "order": [f"item{i}" for i in range(7)]}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    lines = (tmp_path / "records.rank0.jsonl").read_text().splitlines()
    assert [json.loads(ln)["id"] for ln in lines] == [f"item{i}" for i in range(7)]


def test_an_interrupted_run_resumed_gives_the_same_summary(tmp_path: Path) -> None:
    full = run_items(ITEMS, evaluate, summarize, tmp_path / "full")
    out = tmp_path / "cut"
    run_items(ITEMS, evaluate, summarize, out)
    path = out / "records.rank0.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:9])  # killed while writing item3
    (out / "summary.json").unlink()
    calls.clear()
    resumed = run_items(ITEMS, evaluate, summarize, out, resume=True)
    assert resumed == full
    assert calls == ["item3", "item4", "item5", "item6"]  # nothing done twice
    assert len(read_records(out)) == 7


def test_bad_items_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="items: expected at least one item"):
        run_items([], evaluate, summarize, tmp_path)
    with pytest.raises(InputError, match="unique, non-empty 'id'"):
        run_items([{"id": "a", "value": 1}, {"id": "a", "value": 2}], evaluate, summarize,
                  tmp_path)


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_runs import ITEMS, evaluate, summarize
from mmexplain.runs import run_items, join_world, leave_world
world = join_world()
run_items(ITEMS, evaluate, summarize, {out!r}, world=world)
leave_world(world)
"""


def test_torchrun_with_two_processes_gives_the_single_process_summary(tmp_path: Path) -> None:
    single = run_items(ITEMS, evaluate, summarize, tmp_path / "single")
    script = tmp_path / "run.py"
    out = tmp_path / "dist"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--standalone", str(script)], check=True, env=env,
                   capture_output=True, timeout=120)
    assert json.loads((out / "summary.json").read_text()) == single
    ids0 = [json.loads(ln)["id"] for ln in (out / "records.rank0.jsonl").read_text().splitlines()]
    ids1 = [json.loads(ln)["id"] for ln in (out / "records.rank1.jsonl").read_text().splitlines()]
    assert ids0 == ["item0", "item2", "item4", "item6"] and ids1 == ["item1", "item3", "item5"]
