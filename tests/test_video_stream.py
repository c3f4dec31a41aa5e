"""Whole videos, streamed: windows decoded as they are needed (memory does not grow with
the video's length), the tail window, decoding in a worker thread, overlapping windows
stitched into one map per frame, and folder / multi-file runs of ``mmexplain video``."""

from __future__ import annotations

import json
import threading
import tracemalloc

import numpy as np
import pytest
import torch

from mmexplain.cli import main
from mmexplain.data.video import (
    background,
    iter_frames,
    probe_video,
    read_video,
    sliding_clips,
    stream_windows,
    window_starts,
)
from mmexplain.data.video_folder import expand_video_inputs, output_stems
from mmexplain.errors import InputError
from mmexplain.tasks.video import StitchedMaps

from conftest import shared_file
from video_tiny import empty_torch_cache, mp4_frames, write_video  # noqa: F401 (fixture)

R3D = ["--model", "r3d_18", "--weights", "random", "--size", "32"]


# --------------------------------------------------------------------------- decoding


def test_streamed_windows_are_the_sliding_windows_with_the_tail() -> None:
    path = shared_file("video", "armwrestling.mp4")
    video = read_video(path)
    info = probe_video(path)
    assert (info.num_frames, info.fps, info.size) == (280, 28.0, (256, 340))
    streamed = list(stream_windows(path, 16, 64))
    expected = sliding_clips(video, 16, 64, tail=True)
    assert [c.indices[0] for c in streamed] == [0, 64, 128, 192, 256, 264]  # 264: the tail
    for ours, ref in zip(streamed, expected, strict=True):
        assert ours.indices == ref.indices and torch.equal(ours.frames, ref.frames)
    assert [c.indices[0] for c in stream_windows(path, 16, 64, max_clips=2)] == [0, 64]
    assert window_starts(164, 16, 16, tail=True)[-2:] == [144, 148]  # the 164 frames
    assert window_starts(164, 16, 16)[-1] == 144  # without the tail: frames 160-163 dropped
    assert window_starts(160, 16, 16, tail=True)[-1] == 144  # nothing left over: no tail


def test_streamed_windows_hold_one_window_whatever_the_video_length(tmp_path) -> None:
    """tracemalloc (numpy reports its buffers to it): the peak while iterating the windows
    of a 60- and a 240-frame video is about one window of frames, not the video."""
    frame_bytes = 96 * 128 * 3
    peaks = []
    for frames in (60, 240):
        path = write_video(tmp_path / f"v{frames}.mp4", frames, size=(96, 128))
        tracemalloc.start()
        count = sum(1 for _ in stream_windows(path, 8, 4))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == (frames - 8) // 4 + 1
        peaks.append(peak)
    assert peaks[1] < 4 * 8 * frame_bytes  # a few windows' worth at most (240 frames: 30x)
    assert peaks[1] < 1.25 * peaks[0]  # 4x the frames, about the same peak


def test_frames_are_transformed_as_they_are_decoded(tmp_path) -> None:
    from mmexplain.adapters.tv import preprocess_of
    from torchvision.models.video import R3D_18_Weights

    pre = preprocess_of(R3D_18_Weights.DEFAULT, video=True).at_size(32)
    path = write_video(tmp_path / "v.mp4", 12)
    clips = list(stream_windows(path, 8, 4, transform=pre.frame))
    assert [c.indices[0] for c in clips] == [0, 4]
    full = list(stream_windows(path, 8, 4))
    assert torch.equal(clips[1].frames, pre.geometry(full[1].frames))  # per frame = batched
    assert len(list(iter_frames(path, stop=5))) == 5


def test_background_keeps_order_raises_where_it_failed_and_stops_early() -> None:
    assert list(background(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise InputError("video: expected a decodable video file, received 'x': corrupt")

    got = []
    with pytest.raises(InputError, match="received 'x': corrupt"):
        for item in background(failing()):
            got.append(item)
    assert got == [1]
    before = threading.active_count()
    it = background(iter(range(1000)), depth=2)
    assert next(it) == 0
    it.close()  # the worker stops, it does not decode the rest
    assert threading.active_count() == before
    with pytest.raises(InputError, match="depth: expected a positive number of items"):
        next(background([], depth=0))


def test_stitched_maps_average_the_windows_covering_each_frame() -> None:
    st = StitchedMaps()
    a = torch.arange(4.0).view(1, 2, 1, 2)  # (K=1, T'=2, 1, 2): slices [0, 1], [2, 3]
    b = 10 + torch.arange(4.0).view(1, 2, 1, 2)
    st.add(a, range(0, 4))  # frames 0, 1 <- slice 0; frames 2, 3 <- slice 1
    st.add(b, range(2, 6))  # frames 2, 3 <- slice 0; 4, 5 <- slice 1
    maps = st.maps()[0, :, 0]  # (6, 2)
    assert st.counts.tolist() == [1, 1, 2, 2, 1, 1]
    assert maps.tolist() == [[0, 1], [0, 1], [6, 7], [6, 7], [12, 13], [12, 13]]
    mass = torch.tensor([1, 1, 13, 13, 25, 25.0])
    torch.testing.assert_close(st.importance()[0], mass / mass.sum())
    with pytest.raises(InputError, match=r"maps: expected maps of 1 targets on a \(1, 2\) grid"):
        st.add(torch.zeros(2, 2, 1, 2), range(6, 10))


# --------------------------------------------------------------------------- command


def test_the_tail_is_explained_and_the_mp4_shows_each_frame_once(tmp_path, capsys) -> None:
    path = write_video(tmp_path / "twenty.mp4", 20)
    torch.manual_seed(0)  # random weights: the same model in both runs
    rc = main(["video", str(path), *R3D, "--window", "8", "--stride", "5", "--out",
               str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0 and "4 windows of 8 frames, stride 5; frames 0-19 explained" in out
    saved = np.load(tmp_path / "out" / "twenty_r3d-18_gradcam.npz")
    assert saved["frame_indices"][:, 0].tolist() == [0, 5, 10, 12]  # 12: the tail window
    assert saved["frame_indices"][-1].tolist() == list(range(12, 20))
    covering = [sum(s <= n < s + 8 for s in (0, 5, 10, 12)) for n in range(20)]
    assert saved["frame_windows"].tolist() == covering
    assert mp4_frames(tmp_path / "out" / "twenty_r3d-18_gradcam.mp4") == 20
    (record,) = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert record["frames"] == 20 and record["windows"] == 4
    # the decoding worker changes nothing: the same maps in sequence
    torch.manual_seed(0)
    assert main(["video", str(path), *R3D, "--window", "8", "--stride", "5", "--sequential",
                 "--out", str(tmp_path / "seq")]) == 0
    again = np.load(tmp_path / "seq" / "twenty_r3d-18_gradcam.npz")
    np.testing.assert_array_equal(again["frame_indices"], saved["frame_indices"])
    np.testing.assert_allclose(again["maps"], saved["maps"], rtol=1e-5, atol=1e-8)


def test_a_folder_with_equal_stems_overwrite_and_resume(tmp_path, capsys) -> None:
    videos = tmp_path / "videos"
    for sub, frames in (("a", 16), ("b", 20), ("b/c", 16)):
        (videos / sub).mkdir(parents=True)
        write_video(videos / sub / "clip.mp4", frames, seed=frames)
    (videos / "notes.txt").write_text("not a video")
    paths = expand_video_inputs([videos])
    assert [p.relative_to(videos.resolve()).as_posix() for p in paths] == \
        ["a/clip.mp4", "b/c/clip.mp4", "b/clip.mp4"]
    assert output_stems(paths) == ["a__clip", "b__c__clip", "b__clip"]
    out = tmp_path / "out"
    args = ["video", str(videos), *R3D, "--max-windows", "1", "--out", str(out)]
    torch.manual_seed(0)  # random weights: the same model when resumed
    assert main(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["video"] for r in lines] == [str(p) for p in paths]
    assert sorted(p.name for p in out.glob("*.npz")) == \
        [f"{s}_r3d-18_gradcam.npz" for s in ("a__clip", "b__c__clip", "b__clip")]
    records = (out / "records.rank0.jsonl").read_text().splitlines()
    assert [json.loads(r)["id"] for r in records] == \
        [f"{s}_r3d-18_gradcam" for s in ("a__clip", "b__c__clip", "b__clip")]
    index = (out / "index.html").read_text()  # each video's overlay, actions and curve
    assert index.count("<video") == 3 and index.count("<img") == 3
    assert index.index(f"{paths[0]} (16 frames, 1 windows)") < index.index(str(paths[2]))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["videos"], summary["frames"], summary["windows"]) == (3, 48, 3)  # 1 window
    stamp = (out / "a__clip_r3d-18_gradcam.mp4").stat().st_mtime_ns
    assert main(args) == 2  # nothing a user made is overwritten
    err = capsys.readouterr().err
    assert f"--out: expected a folder without this run's outputs (or --overwrite / --resume), " \
           f"received '{out}', which holds 6 of them" in err
    assert (out / "a__clip_r3d-18_gradcam.mp4").stat().st_mtime_ns == stamp
    # as if interrupted while the last video's outputs were being written
    (out / "records.rank0.jsonl").write_text("\n".join(records[:2]) + "\n")
    (out / "b__clip_r3d-18_gradcam.npz").unlink()
    torch.manual_seed(0)
    assert main([*args, "--resume"]) == 0
    assert "resume: 2 of 3 videos already done" in capsys.readouterr().out
    assert (out / "b__clip_r3d-18_gradcam.npz").is_file()
    again = (out / "records.rank0.jsonl").read_text().splitlines()
    assert again[:2] == records[:2] and json.loads(again[2]) == json.loads(records[2])
    assert (out / "a__clip_r3d-18_gradcam.mp4").stat().st_mtime_ns == stamp  # not redone
    assert main([*args, "--overwrite"]) == 0
    assert (out / "a__clip_r3d-18_gradcam.mp4").stat().st_mtime_ns != stamp


def test_files_and_globs_and_inputs_that_match_nothing(tmp_path, capsys) -> None:
    one = write_video(tmp_path / "one.mp4", 16)
    two = write_video(tmp_path / "two.mp4", 16, seed=1)
    assert expand_video_inputs([str(tmp_path / "*.mp4"), one]) == [one.resolve(), two.resolve()]
    assert main(["video", str(one), str(two), *R3D, "--out", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").glob("*.mp4")) == \
        ["one_r3d-18_gradcam.mp4", "two_r3d-18_gradcam.mp4"]
    capsys.readouterr()
    assert main(["video", str(tmp_path / "missing*.avi"), *R3D]) == 2
    assert (f"input: expected a video file, a folder of videos or a glob pattern, received "
            f"'{tmp_path / 'missing*.avi'}': the pattern matches no file"
            ) in capsys.readouterr().err
    assert main(["video", str(tmp_path / "missing.avi"), *R3D]) == 2
    assert f"'{tmp_path / 'missing.avi'}': no such file or folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["video", str(empty), *R3D]) == 2
    assert f"'{empty}', which holds none" in capsys.readouterr().err


def test_each_frame_is_labelled_by_the_nearest_covering_window_without_a_frames_by_windows_table(
        ) -> None:
    """The overlay's action band reads the window whose centre is nearest each frame (ties:
    the earlier window; -1 where none covers it), equal to the frames x windows reference,
    on overlapping, uneven and tail windows with gaps."""
    from mmexplain.commands import _nearest_windows

    rng = np.random.default_rng(0)
    for _ in range(20):
        frames = int(rng.integers(1, 80))
        starts = sorted(rng.integers(0, frames, size=int(rng.integers(1, 9))).tolist())
        windows = [list(range(s, s + int(rng.integers(1, 17)))) for s in starts]
        first = np.array([w[0] for w in windows])[None, :]
        last = np.array([w[-1] for w in windows])[None, :]
        n = np.arange(frames)[:, None]
        distance = np.where((first <= n) & (n <= last), np.abs(n - (first + last) / 2), np.inf)
        reference = np.where(np.isfinite(distance.min(axis=1)), distance.argmin(axis=1), -1)
        np.testing.assert_array_equal(_nearest_windows(windows, frames), reference)
    # a tie: frame 8 is 0.5 from the centres of frames 0-15 (7.5) and 1-16 (8.5) -> the first
    assert _nearest_windows([list(range(0, 16)), list(range(1, 17))], 17).tolist()[8] == 0
