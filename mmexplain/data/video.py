"""Video clips through ``av``: decode once, sample clips, apply a model's preprocessing.

    video = read_video("armwrestling.mp4")          # frames (T, H, W, 3) uint8, fps, duration
    clips = sliding_clips(video, length=16, stride=16)   # windows at frames 0, 16, 32, ...
    clip = uniform_clip(video, length=16)            # 16 evenly spaced frames over the video
    x = adapter.preprocess.clips(clips)              # (B, 3, 16, h, w) model input

A :class:`Clip` keeps the decoded frames it was cut from, their frame numbers in
the video (``indices``) and the frame rate, so a map's time slice ``t`` (after
upsampling to the clip's length) belongs to frame ``indices[t]`` at time
``indices[t] / fps`` seconds.

:class:`Preprocess` is a model's input pipeline (resize, centre crop, scale to
[0, 1], normalise with mean/std), the same operations and order as
torchvision's ``ImageClassification`` / ``VideoClassification`` presets, split
in two so overlays can be drawn on exactly the pixels the model saw:
``geometry`` (resize + crop, uint8) and ``normalize`` (float).

A file that cannot be decoded (missing, not a video, corrupt) or that is
shorter than the clip asked for raises :class:`~mmexplain.errors.InputError`
naming the file and the problem.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from queue import Full, Queue
from typing import Any, Iterator, Sequence, TypeVar

import numpy as np
import torch

from mmexplain.errors import InputError, bad_type, bad_value

T = TypeVar("T")

__all__ = [
    "Clip",
    "Preprocess",
    "Video",
    "VideoInfo",
    "VideoWriter",
    "background",
    "iter_frames",
    "probe_video",
    "read_video",
    "stream_windows",
    "sliding_clips",
    "uniform_clip",
    "uniform_indices",
    "window_starts",
]


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True, eq=False)
class Video:
    """A decoded video: every frame as ``uint8`` RGB.

    frames    (N, H, W, 3) uint8
    fps       frames per second (the stream's average rate)
    duration  seconds (the stream's duration, else N / fps)
    """

    path: Path
    frames: torch.Tensor
    fps: float
    duration: float

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the frames."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])


def _video_error(path: Path, problem: str) -> InputError:
    return InputError(f"video: expected a decodable video file, received {str(path)!r}: {problem}")


@dataclass(frozen=True)
class VideoInfo:
    """What a video file's header says, before any frame is decoded.

    num_frames  the stream's frame count (0 when the container does not say; decoding
                the whole file is the only exact count then)
    """

    path: Path
    fps: float
    duration: float
    size: tuple[int, int]
    num_frames: int


def _open(path: str | os.PathLike[str]) -> tuple[Any, Any, Path]:
    """(container, its first video stream, the path), or an InputError naming the file."""
    import av

    if not isinstance(path, (str, os.PathLike)):
        raise bad_type("video", "a video file path (str or os.PathLike)", path)
    p = Path(path)
    if not p.exists():
        raise _video_error(p, "the file does not exist")
    if not p.is_file():
        raise _video_error(p, "it is not a file")
    try:
        container = av.open(str(p))
    except av.error.FFmpegError as exc:
        raise _video_error(p, f"not a video container av can read ({exc.strerror or exc})") from exc
    if not container.streams.video:
        container.close()
        raise _video_error(p, "the file has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream, p


def _info(stream: Any, p: Path, counted: int | None = None) -> VideoInfo:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if not fps > 0:
        raise _video_error(p, "the video stream has no frame rate")
    n = counted if counted is not None else int(stream.frames or 0)
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * Fraction(stream.time_base))
    else:
        duration = n / fps
    return VideoInfo(path=p, fps=fps, duration=duration, size=(stream.height, stream.width),
                     num_frames=n)


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """The frame rate, duration, frame size and (header) frame count of ``path``; decodes
    nothing."""
    container, stream, p = _open(path)
    try:
        return _info(stream, p)
    finally:
        container.close()


def iter_frames(path: str | os.PathLike[str], stop: int | None = None,
                transform: Callable[[np.ndarray], np.ndarray] | None = None
                ) -> Iterator[np.ndarray]:
    """Decode the frames of ``path`` one at a time, (H, W, 3) uint8 RGB, in order.

    Only the frame being handed out is held: memory does not grow with the
    video's length. ``stop``: decode frames 0 .. stop - 1 only. ``transform``:
    applied to each frame as it is decoded (e.g. :meth:`Preprocess.frame`, so
    only model-sized frames are held). Errors name the file (corrupt stream, no
    frame at all, a frame size that changes).
    """
    import av

    container, stream, p = _open(path)
    try:
        _info(stream, p)  # a stream without a frame rate is named before decoding
        first = None
        count = 0
        try:
            for frame in container.decode(stream):
                if stop is not None and count >= stop:
                    break
                rgb = frame.to_ndarray(format="rgb24")
                if first is None:
                    first = rgb.shape
                elif rgb.shape != first:
                    raise _video_error(p, "the frame size changes within the stream")
                count += 1
                yield rgb if transform is None else transform(rgb)
        except av.error.FFmpegError as exc:
            raise _video_error(p, f"the video stream is corrupt ({exc.strerror or exc})") from exc
        if first is None:
            raise _video_error(p, "no frame could be decoded (empty or corrupt stream)")
    finally:
        container.close()


def read_video(path: str | os.PathLike[str]) -> Video:
    """Decode every frame of the first video stream of ``path`` (once).

    Raises :class:`InputError` naming the file when it is missing, is not a
    video (no video stream, not a container ``av`` can read) or is corrupt
    (the decoder fails, or no frame decodes). Long videos: :func:`stream_windows`
    decodes only the frames the windows in flight need.
    """
    frames = list(iter_frames(path))
    container, stream, p = _open(path)
    try:
        info = _info(stream, p, counted=len(frames))
    finally:
        container.close()
    return Video(path=p, frames=torch.from_numpy(np.stack(frames)), fps=info.fps,
                 duration=info.duration)


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True, eq=False)
class Clip:
    """``length`` frames of a video, with where they came from.

    frames   (L, H, W, 3) uint8 decoded frames (a view of the video's frames for windows)
    indices  (L,) frame numbers in the video, increasing
    fps      the video's frame rate: frame ``indices[t]`` is at ``indices[t] / fps`` s
    """

    frames: torch.Tensor
    indices: tuple[int, ...]
    fps: float
    source: str | None = None

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def times(self) -> tuple[float, ...]:
        """Seconds from the start of the video of each frame."""
        return tuple(i / self.fps for i in self.indices)


def read_uniform_frames(path: str | os.PathLike[str], count: int
                        ) -> tuple[np.ndarray, list[int]]:
    """``count`` frames spread evenly over a video (:func:`uniform_indices`; all of them
    when it has fewer), decoded in one streamed pass that holds only the frames kept:
    ((n, H, W, 3) uint8, their frame numbers)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise bad_value("count", "a positive number of frames", count)
    total = probe_video(path).num_frames or sum(1 for _ in iter_frames(path))
    indices = uniform_indices(total, min(count, total))
    wanted, kept = set(indices), []
    for i, frame in enumerate(iter_frames(path, stop=indices[-1] + 1)):
        if i in wanted:
            kept.append(frame)
    return np.stack(kept), indices[:len(kept)]


def _check_length(num_frames: int, length: int, source: str | None) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise bad_value("length", "a positive number of frames per clip", length)
    if num_frames < length:
        raise InputError(f"video: expected at least {length} frames for a {length}-frame clip, "
                         f"received {source or 'a video'!s} with {num_frames} frames")


def uniform_indices(num_frames: int, length: int = 16) -> list[int]:
    """``length`` evenly spaced frame numbers from the first frame to the last.

    Index i is round(i (N - 1) / (L - 1)) (halves rounded up), in integers.
    """
    _check_length(num_frames, length, None)
    if length == 1:
        return [(num_frames - 1) // 2]
    span, steps = num_frames - 1, length - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(length)]


def window_starts(num_frames: int, length: int = 16, stride: int | None = None,
                  tail: bool = False) -> list[int]:
    """First frames of the sliding windows 0, S, 2S, ... that fit in the video.

    ``stride`` defaults to ``length`` (back-to-back windows). ``tail=False``:
    frames after the last full window are not covered (at most ``stride - 1``
    of them); ``tail=True``: one more window aligned to the end of the video
    (starting at ``num_frames - length``) covers them.
    """
    _check_length(num_frames, length, None)
    stride = _check_stride(length, stride)
    starts = list(range(0, num_frames - length + 1, stride))
    if tail and starts[-1] + length < num_frames:
        starts.append(num_frames - length)
    return starts


def _check_stride(length: int, stride: int | None) -> int:
    stride = length if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise bad_value("stride", "a positive number of frames", stride)
    return stride


def uniform_clip(video: Video, length: int = 16) -> Clip:
    """One clip of ``length`` evenly spaced frames covering the whole video."""
    _check_length(len(video), length, repr(str(video.path)))
    idx = uniform_indices(len(video), length)
    frames = video.frames[torch.tensor(idx)]  # (L, H, W, 3)
    return Clip(frames=frames, indices=tuple(idx), fps=video.fps, source=str(video.path))


def _check_max(max_clips: int | None) -> None:
    if max_clips is not None and (isinstance(max_clips, bool) or not isinstance(max_clips, int)
                                  or max_clips < 1):
        raise bad_value("max_clips", "a positive int or None", max_clips)


def sliding_clips(video: Video, length: int = 16, stride: int | None = None,
                  max_clips: int | None = None, tail: bool = False) -> list[Clip]:
    """Windows of ``length`` consecutive frames every ``stride`` frames (see :func:`window_starts`;
    ``tail=True`` adds the window aligned to the end). ``max_clips`` keeps the first windows only.
    """
    _check_length(len(video), length, repr(str(video.path)))
    starts = window_starts(len(video), length, stride, tail)
    _check_max(max_clips)
    if max_clips is not None:
        starts = starts[:max_clips]
    return [Clip(frames=video.frames[s:s + length], indices=tuple(range(s, s + length)),
                 fps=video.fps, source=str(video.path)) for s in starts]


def stream_windows(path: str | os.PathLike[str], length: int = 16, stride: int | None = None,
                   max_clips: int | None = None, tail: bool = True,
                   transform: Callable[[np.ndarray], np.ndarray] | None = None
                   ) -> Iterator[Clip]:
    """The windows of :func:`sliding_clips` (``tail=True``: the end-aligned last window
    included), decoded as they are needed.

    Only the last ``length`` decoded frames are held (one window): memory does not
    grow with the video's length; with ``transform`` (e.g. :meth:`Preprocess.frame`)
    each frame is transformed once as it is decoded, so the windows hold transformed
    frames and overlapping windows do not resize a frame twice. The number of frames
    is known only at the end of the stream, so the tail window comes last; a video
    shorter than ``length`` raises the same error as :func:`sliding_clips` once its end
    is reached.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise bad_value("length", "a positive number of frames per clip", length)
    stride = _check_stride(length, stride)
    _check_max(max_clips)
    info = probe_video(path)
    source = str(info.path)
    held: deque[np.ndarray] = deque(maxlen=length)
    start, emitted, covered, count = 0, 0, 0, 0  # covered: frames 0 .. covered - 1 explained
    for i, frame in enumerate(iter_frames(path, transform=transform)):
        held.append(frame)
        count = i + 1
        if i == start + length - 1:  # held = frames start .. i
            yield Clip(frames=torch.from_numpy(np.stack(held)), indices=tuple(range(start, count)),
                       fps=info.fps, source=source)
            emitted, covered, start = emitted + 1, count, start + stride
            if max_clips is not None and emitted >= max_clips:
                return
    _check_length(count, length, repr(source))
    if tail and covered < count:
        yield Clip(frames=torch.from_numpy(np.stack(held)),
                   indices=tuple(range(count - length, count)), fps=info.fps, source=source)


def background(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` in a worker thread, up to ``depth`` items ahead of the consumer.

    Decoding (PyAV) and torch's resizing release the GIL, so the next clips are
    decoded and preprocessed while the model runs on the current ones. An
    exception in the worker is raised in the consumer at the item where it
    happened; closing the iterator early stops the worker.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise bad_value("depth", "a positive number of items", depth)
    queue: Queue[tuple[str, Any]] = Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put(("error", exc))
            return
        put(("done", None))

    worker = threading.Thread(target=work, name="mmexplain-decode", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = queue.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join()


# --------------------------------------------------------------------------- writing


class VideoWriter:
    """An H.264 MP4 written frame batch by frame batch (nothing but the encoder held).

        with VideoWriter("out.mp4", fps=28) as writer:
            writer.write(frames)              # (n, H, W, 3) uint8, any n, same H, W

    ``yuv420p`` (what browsers play) needs even sizes: an odd height or width is
    edge-padded by one pixel. ``frames_written`` counts the frames.
    """

    def __init__(self, path: str | os.PathLike[str], fps: float, crf: int = 18) -> None:
        if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not fps > 0:
            raise bad_value("fps", "a positive number", fps)
        self.path = Path(path)
        self.rate = Fraction(fps).limit_denominator(1001)
        self.crf = crf
        self.frames_written = 0
        self._container: Any = None
        self._stream: Any = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def write(self, frames: np.ndarray) -> None:
        import av

        if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[3] != 3 \
                or frames.dtype != np.uint8:
            raise bad_value("frames", "a (n, H, W, 3) uint8 array", frames)
        h, w = frames.shape[1:3]
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self._container is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self.path), mode="w", format="mp4",
                                      container_options={"movflags": "+faststart"})
            codec = "libx264" if "libx264" in av.codecs_available else "h264"
            self._stream = self._container.add_stream(codec, rate=self.rate)
            self._stream.height, self._stream.width = frames.shape[1:3]
            self._stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                self._stream.options = {"crf": str(self.crf)}
        for frame in frames:
            packet = self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24"))
            self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> None:
        if self._container is not None:
            self._container.mux(self._stream.encode(None))
            self._container.close()
            self._container = None


# --------------------------------------------------------------------------- preprocessing


def _pair(value: Any, arg: str) -> tuple[int, ...]:
    vals = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(vals) <= 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                          for v in vals):
        raise bad_value(arg, "a positive int or a pair of positive ints", value)
    return vals


@dataclass(frozen=True)
class Preprocess:
    """A model's input pipeline, in torchvision's preset order.

    resize     (s,): the shorter side to s (aspect kept); (h, w): exactly h x w
    crop       (h, w) centre crop after resizing
    mean, std  per RGB channel, on values in [0, 1]: x = (u / 255 - mean) / std
    antialias  antialiased resizing (torchvision: True for images, False for video)
    interpolation  "bilinear" (default), "bicubic" or "nearest"

    Images are ``(3, h, w)`` model inputs, clips ``(3, T, h, w)`` (the layout
    of torchvision's video models and C3D).
    """

    resize: tuple[int, ...]
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    antialias: bool = True
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise bad_value("interpolation", "'bilinear', 'bicubic' or 'nearest'",
                            self.interpolation)
        object.__setattr__(self, "resize", _pair(self.resize, "resize"))
        crop = _pair(self.crop, "crop")
        object.__setattr__(self, "crop", crop * 2 if len(crop) == 1 else crop)
        for arg in ("mean", "std"):
            vals = tuple(float(v) for v in getattr(self, arg))
            if len(vals) != 3 or (arg == "std" and min(vals) <= 0):
                raise bad_value(arg, "three numbers (one per RGB channel), std > 0",
                                getattr(self, arg))
            object.__setattr__(self, arg, vals)

    def at_size(self, size: int) -> "Preprocess":
        """The same pipeline for a ``size`` x ``size`` crop, resizes scaled to match."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise bad_value("size", "a positive crop size in pixels", size)
        scale = size / max(self.crop)
        resize = tuple(max(size, round(r * scale)) for r in self.resize)
        return replace(self, resize=resize, crop=(size, size))

    def geometry(self, frames: torch.Tensor) -> torch.Tensor:
        """Resize and centre-crop ``uint8`` frames (N, H, W, 3) -> (N, h, w, 3), still uint8."""
        # the functional API the torchvision presets use, for identical uint8 rounding
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        if not isinstance(frames, torch.Tensor):
            raise bad_type("frames", "a (N, H, W, 3) uint8 tensor", frames)
        if frames.dim() != 4 or frames.shape[3] != 3 or frames.dtype != torch.uint8:
            raise bad_value("frames", "a (N, H, W, 3) uint8 tensor", frames)
        x = frames.permute(0, 3, 1, 2)  # (N, 3, H, W)
        x = TF.resize(x, list(self.resize), interpolation=InterpolationMode(self.interpolation),
                      antialias=self.antialias)
        x = TF.center_crop(x, list(self.crop))  # (N, 3, h, w)
        return x.permute(0, 2, 3, 1).contiguous()  # (N, h, w, 3)

    def frame(self, frame: np.ndarray) -> np.ndarray:
        """One decoded frame (H, W, 3) uint8 -> resized and cropped (h, w, 3) uint8, as
        :meth:`geometry` does it for a batch (``iter_frames(..., transform=pre.frame)``)."""
        return self.geometry(torch.from_numpy(np.ascontiguousarray(frame))[None])[0].numpy()

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """``uint8`` (N, h, w, 3) -> float (N, 3, h, w): (u / 255 - mean) / std."""
        x = frames.permute(0, 3, 1, 2).float() / 255.0  # (N, 3, h, w)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def image(self, image: Any) -> tuple[torch.Tensor, np.ndarray]:
        """An image -> (model input (3, h, w), the resized/cropped image (h, w, 3) uint8).

        ``image``: anything :func:`mmexplain.render.to_uint8_image` accepts
        (PIL image, (H, W, 3) uint8 array, (3, H, W) tensor in [0, 1] or uint8).
        """
        from mmexplain.render import to_uint8_image

        u8 = torch.from_numpy(to_uint8_image(image)).unsqueeze(0)  # (1, H, W, 3)
        shown = self.geometry(u8)  # (1, h, w, 3)
        return self.normalize(shown)[0], shown[0].numpy()

    def clip(self, clip: Clip | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A clip (or its (T, H, W, 3) uint8 frames) -> (model input (3, T, h, w),
        the resized/cropped frames (T, h, w, 3) uint8)."""
        frames = clip.frames if isinstance(clip, Clip) else clip
        shown = self.geometry(frames)  # (T, h, w, 3)
        return self.normalize(shown).transpose(0, 1), shown  # (3, T, h, w)

    def clips(self, clips: Clip | torch.Tensor | Sequence[Clip | torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips of one length (or their uint8 frames) -> (model input (B, 3, T, h, w),
        shown frames (B, T, h, w, 3))."""
        if isinstance(clips, (Clip, torch.Tensor)):
            clips = [clips]
        if not clips:
            raise bad_value("clips", "at least one clip", clips)
        lengths = {len(c) for c in clips}
        if len(lengths) != 1:
            raise bad_value("clips", "clips of one length", f"lengths {sorted(lengths)}", raw=True)
        pairs = [self.clip(c) for c in clips]
        return torch.stack([x for x, _ in pairs]), torch.stack([s for _, s in pairs])
