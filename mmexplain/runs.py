"""Dataset runs: one JSON line per item as it is produced, resumable, sharded.

A run evaluates a list of items (each a dict with a unique ``"id"``) with a
function ``evaluate(item) -> dict`` and folds the records into a summary with
``summarize(records) -> dict``. Records are appended to
``OUT/records.rank{R}.jsonl`` and flushed one line at a time, so an
interrupted run loses at most the item it was working on; ``resume=True``
skips every id already present in any rank's file (the world size may change
between runs). Under ``torchrun --nproc-per-node N`` each process takes every
N-th item (``torch.distributed``: gloo on CPUs, NCCL on GPUs); rank 0 merges
the files in the items' order and writes ``OUT/summary.json``. Without
torchrun the run is single-process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmexplain.errors import bad_value


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    started_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_world() -> World:
    """Join the torchrun process group when the environment says there is one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size(), started_here=True)


def leave_world(world: World) -> None:
    if world.started_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def read_records(out: Path) -> dict[str, dict[str, Any]]:
    """Every complete record of every rank's file, by id (a torn last line is skipped)."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob("records.rank*.jsonl")):
        with path.open() as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line being written when the run was interrupted
                if isinstance(rec, dict) and "id" in rec:
                    records[str(rec["id"])] = rec
    return records


def run_items(
    items: Sequence[dict[str, Any]],
    evaluate: Callable[[dict[str, Any]], dict[str, Any]],
    summarize: Callable[[list[dict[str, Any]]], dict[str, Any]],
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool | None = None,
    desc: str = "eval",
    world: World | None = None,
) -> dict[str, Any] | None:
    """Evaluate ``items`` (sharded over the world), write records and, on rank 0, the summary.

    Returns the summary on rank 0 and None elsewhere.
    """
    ids = [str(item.get("id", "")) for item in items]
    if not items:
        raise bad_value("items", "at least one item to evaluate", "an empty list", raw=True)
    if len(set(ids)) != len(ids) or "" in ids:
        raise bad_value("items", "items with unique, non-empty 'id' fields",
                        f"{len(ids) - len(set(ids))} duplicate ids", raw=True)
    world = world or join_world()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = read_records(out) if resume else {}
    if not resume and world.is_main:
        for old in out.glob("records.rank*.jsonl"):
            old.unlink()
        (out / "summary.json").unlink(missing_ok=True)
    barrier(world)
    mine = [item for i, item in enumerate(items) if i % world.size == world.rank
            and str(item["id"]) not in done]
    show = progress if progress is not None else (world.is_main and len(mine) > 20)
    path = out / f"records.rank{world.rank}.jsonl"
    _repair_tail(path)
    with path.open("a") as fh:
        for item in _progress(mine, show, desc):
            record = {"id": str(item["id"]), **evaluate(item)}
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
    barrier(world)
    if not world.is_main:
        return None
    records = read_records(out)
    missing = [i for i in ids if i not in records]
    if missing:
        raise bad_value("records", "a record for every item", f"{len(missing)} missing, "
                        f"for example {missing[:3]}", raw=True)
    ordered = [records[i] for i in ids]
    summary = {"items": len(ordered), **summarize(ordered)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _repair_tail(path: Path) -> None:
    """End a file whose last line was torn by an interruption with a newline."""
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")


def _progress(items: Iterable[Any], show: bool, desc: str) -> Iterable[Any]:
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="item")
