"""Clips per second over a folder: decoding overlapped with the model vs in sequence vs the
model alone on clips decoded beforehand (the floor).

    python scripts/video_overlap.py                     # 6 clips of 64 frames, R3D-18 at 112
    python scripts/video_overlap.py --clips 4 --frames 96 --repeats 3

The clips are generated 640x480 H.264 videos (``video_memory.write_clip``). Each mode
explains every window of every clip (back-to-back 16-frame windows, 4 per batch, Grad-CAM
at the default layer) as ``mmexplain video`` does (``commands._explain_windows``, without
rendering the MP4); the modes are alternated ``--repeats`` times in one process and the
best time of each is kept (the machine's other load only adds time).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def floor_batches(adapter, paths, window: int, batch: int) -> list[torch.Tensor]:
    """Every window's model input, decoded and preprocessed beforehand."""
    from mmexplain.data.video import stream_windows

    out = []
    for path in paths:
        clips = list(stream_windows(path, window, transform=adapter.preprocess.frame))
        for i in range(0, len(clips), batch):
            out.append(torch.stack([adapter.preprocess.normalize(c.frames).transpose(0, 1)
                                    for c in clips[i:i + batch]]))
    return out


def main() -> None:
    from video_memory import write_clip

    from mmexplain.adapters import get_adapter
    from mmexplain.commands import _explain_windows
    from mmexplain.tasks.video import explain_clip

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mmexplain-overlap-"))
    paths = [folder / f"clip{i}.mp4" for i in range(args.clips)]
    for path in paths:
        write_clip(path, args.frames / 30, fps=30)
    torch.manual_seed(0)
    adapter = get_adapter("r3d_18", weights=False, size=args.size)
    run = argparse.Namespace(stride=None, max_windows=None, batch_size=4, actions=None,
                             method="gradcam", per_slice=False, top=1, bf16=False)
    floor = floor_batches(adapter, paths, 16, 4)

    def explain_all(sequential: bool) -> None:
        run.sequential = sequential
        with redirect_stdout(io.StringIO()):
            for path in paths:
                _explain_windows(run, adapter, path, 16)

    def model_alone() -> None:
        for x in floor:
            explain_clip(adapter, x)

    modes = {"overlapped": lambda: explain_all(False), "sequential": lambda: explain_all(True),
             "model alone (floor)": model_alone}
    best = {name: float("inf") for name in modes}
    for _ in range(args.repeats):
        for name, fn in modes.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    for name, seconds in best.items():
        print(json.dumps({"mode": name, "clips": args.clips, "seconds": round(seconds, 2),
                          "clips_per_s": round(args.clips / seconds, 3)}))
    print(f"overlapped / sequential speed-up: {best['sequential'] / best['overlapped']:.2f}x; "
          f"overlapped / floor time: {best['overlapped'] / best['model alone (floor)']:.2f}x "
          f"({torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    main()
