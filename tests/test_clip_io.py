"""Clip I/O with av: decoding, clip sampling, model preprocessing, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmexplain.data.video import (
    Clip,
    Preprocess,
    read_video,
    sliding_clips,
    uniform_clip,
    uniform_indices,
    window_starts,
)
from mmexplain.errors import InputError
from mmexplain.render import write_mp4

from conftest import shared_file


@pytest.fixture(scope="module")
def armwrestling():
    return read_video(shared_file("video", "armwrestling.mp4"))


def test_decodes_the_real_clip_once_with_its_rate_and_duration(armwrestling) -> None:
    video = armwrestling
    assert len(video) == 280 and video.fps == 28.0 and video.duration == 10.0
    assert video.size == (256, 340)
    assert video.frames.shape == (280, 256, 340, 3) and video.frames.dtype == torch.uint8
    # real content that changes over time
    assert float(video.frames.float().std()) > 20
    assert not torch.equal(video.frames[0], video.frames[140])


def test_uniform_indices_cover_the_video_evenly() -> None:
    # round(i * 279 / 15) for i = 0..15
    assert uniform_indices(280, 16) == [0, 19, 37, 56, 74, 93, 112, 130, 149, 167, 186, 205,
                                        223, 242, 260, 279]
    assert uniform_indices(16, 16) == list(range(16))
    assert uniform_indices(31, 16) == list(range(0, 31, 2))
    assert uniform_indices(5, 1) == [2]


def test_sliding_windows_and_their_frame_indices(armwrestling) -> None:
    assert window_starts(280, 16, 64) == [0, 64, 128, 192, 256]
    assert window_starts(280, 16) == list(range(0, 257, 16))  # 17 back-to-back windows
    assert window_starts(40, 16, 12) == [0, 12, 24]
    clips = sliding_clips(armwrestling, 16, stride=64)
    assert [c.indices[0] for c in clips] == [0, 64, 128, 192, 256]
    assert clips[2].indices == tuple(range(128, 144))
    assert torch.equal(clips[2].frames, armwrestling.frames[128:144])
    assert clips[1].times[0] == pytest.approx(64 / 28) and clips[1].fps == 28.0
    assert [c.indices[0] for c in sliding_clips(armwrestling, 16, 100, max_clips=2)] == [0, 100]
    clip = uniform_clip(armwrestling, 16)
    assert clip.indices == tuple(uniform_indices(280, 16))
    assert torch.equal(clip.frames[5], armwrestling.frames[93])


def test_preprocessing_matches_torchvision_presets(armwrestling) -> None:
    from torchvision.models import ResNet18_Weights
    from torchvision.models.video import R3D_18_Weights

    from mmexplain.adapters.tv import preprocess_of

    clip = sliding_clips(armwrestling, 16)[3]
    video_pre = preprocess_of(R3D_18_Weights.DEFAULT, video=True)
    assert video_pre.resize == (128, 171) and video_pre.crop == (112, 112)
    x, shown = video_pre.clip(clip)
    ref = R3D_18_Weights.DEFAULT.transforms()(clip.frames.permute(0, 3, 1, 2))  # (3, T, h, w)
    assert x.shape == (3, 16, 112, 112) and shown.shape == (16, 112, 112, 3)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)

    image_pre = preprocess_of(ResNet18_Weights.DEFAULT, video=False)
    frame = armwrestling.frames[0].numpy()
    x, shown = image_pre.image(frame)
    ref = ResNet18_Weights.DEFAULT.transforms()(torch.from_numpy(frame).permute(2, 0, 1))
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    assert shown.shape == (224, 224, 3) and shown.dtype == np.uint8

    batch, frames = video_pre.clips(sliding_clips(armwrestling, 16, 64, max_clips=2))
    assert batch.shape == (2, 3, 16, 112, 112) and frames.shape == (2, 16, 112, 112, 3)


def test_preprocess_values_and_smaller_sizes() -> None:
    pre = Preprocess(resize=(128, 171), crop=112, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    frames = torch.full((2, 60, 80, 3), 255, dtype=torch.uint8)
    x, shown = pre.clip(frames)
    assert x.shape == (3, 2, 112, 112) and shown.shape == (2, 112, 112, 3)
    assert x[:, 0, 0, 0].tolist() == [1.0, 3.0, 1.0]  # (1 - mean) / std
    small = pre.at_size(32)
    assert small.crop == (32, 32) and small.resize == (37, 49)  # 128 * 32/112, 171 * 32/112
    with pytest.raises(InputError, match=r"std: expected three numbers \(one per RGB channel\), "
                       r"std > 0, received tuple \(1.0, 0.0, 1.0\)"):
        Preprocess(resize=(8,), crop=8, mean=(0, 0, 0), std=(1.0, 0.0, 1.0))


def test_a_written_clip_reads_back_with_its_frame_count_and_rate(tmp_path) -> None:
    frames = np.zeros((20, 32, 48, 3), dtype=np.uint8)
    frames[:, :, :, 0] = np.arange(20, dtype=np.uint8)[:, None, None] * 12
    write_mp4(frames, tmp_path / "ramp.mp4", fps=12)
    video = read_video(tmp_path / "ramp.mp4")
    assert len(video) == 20 and video.fps == 12.0 and video.size == (32, 48)
    red = video.frames[:, 16, 24, 0].float()
    assert torch.all(red[1:] > red[:-1])  # frames in order


# --------------------------------------------------------------------------- errors


def test_missing_and_non_video_files_get_errors_naming_them(tmp_path) -> None:
    missing = tmp_path / "absent.mp4"
    with pytest.raises(InputError, match=rf"video: expected a decodable video file, received "
                       rf"'{missing}': the file does not exist"):
        read_video(missing)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all")
    with pytest.raises(InputError, match=rf"received '{text}': not a video container av can "
                       r"read \(Invalid data found when processing input\)"):
        read_video(text)
    with pytest.raises(InputError, match=rf"received '{tmp_path}': it is not a file"):
        read_video(tmp_path)


def test_a_file_without_a_video_stream_is_named(tmp_path) -> None:
    import av

    path = tmp_path / "sound.wav"
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 8000
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            container.mux(packet)
    with pytest.raises(InputError, match=rf"received '{path}': the file has no video stream"):
        read_video(path)


def test_a_corrupt_video_is_named(armwrestling, tmp_path) -> None:
    data = bytearray(shared_file("video", "armwrestling.mp4").read_bytes())
    cut = tmp_path / "cut.mp4"  # the index (moov box) sits at the end: cut it off
    cut.write_bytes(bytes(data[:100_000]))
    with pytest.raises(InputError, match=rf"video: expected a decodable video file, received "
                       rf"'{cut}': not a video container av can read"):
        read_video(cut)
    scrambled = tmp_path / "scrambled.mp4"  # header intact, every frame's data overwritten
    ftyp_moov = 48  # keep the first box
    data[ftyp_moov:] = bytes(len(data) - ftyp_moov)
    scrambled.write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"received '{scrambled}': "):
        read_video(scrambled)


def test_a_video_shorter_than_a_clip_is_named(tmp_path) -> None:
    path = tmp_path / "short.mp4"
    write_mp4(np.zeros((10, 16, 16, 3), np.uint8), path, fps=5)
    video = read_video(path)
    with pytest.raises(InputError, match=rf"video: expected at least 16 frames for a 16-frame "
                       rf"clip, received '{path}' with 10 frames"):
        sliding_clips(video, 16)
    with pytest.raises(InputError, match=rf"received '{path}' with 10 frames"):
        uniform_clip(video, 16)
    with pytest.raises(InputError, match=r"stride: expected a positive number of frames, "
                       r"received int 0"):
        sliding_clips(video, 4, stride=0)
    assert isinstance(sliding_clips(video, 4, stride=3)[0], Clip)
