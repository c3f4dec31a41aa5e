"""``mmexplain serve``: an interactive explorer of the models' explanations in the browser.

    pip install -e ".[serve]"
    mmexplain serve                                   # http://127.0.0.1:8765, the shapes models
    mmexplain serve --model r3d_18 --model swin3d_t   # more registered models
    mmexplain serve --weights ./blip-base            # a Hugging Face folder beside them

A Starlette app run by uvicorn, with one small hand-written page (``mmexplain/static``:
no CDN, it works with no network). Pick an image (upload, or a freshly generated shapes
scene with its ground truth) or a video (upload, or a generated clip); the page shows
the caption, the answer or the top actions, and the map of each word, answer or action
clicked; type a caption to score or force an answer; switch the method (every registered
one), the layer, the colormap and the opacity; scrub through a video's frames with the
temporal-importance curve; see the pointing hit and the mask where there is ground
truth; download the overlay PNG / MP4 and the ``.npz``.

The work is the commands' own: models are loaded by :func:`mmexplain.commands.build_adapter`,
captions explained by :func:`mmexplain.tasks.caption.explain_caption`, answers by
:func:`mmexplain.tasks.vqa.explain_vqa`, videos by the video command's
``_explain_video`` (sliding windows, the stitched per-frame maps, its MP4 and ``.npz``).

Safe by default: it binds 127.0.0.1 and then answers only this machine's host names; a
POST from another site's page is refused; uploads have size and type limits and are read in
memory or into temporary files the server names (no path from a request reaches the
filesystem); every text reaches the page through ``textContent``, under a
Content-Security-Policy of ``'self'``; a failing request answers a JSON error (4xx for
bad input) and the server goes on; each model is loaded once and used under its own
lock, and every request's input and result live under a random id of their own.
"""

from __future__ import annotations

import argparse
import io
import secrets
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mmexplain.errors import InputError, MMExplainError, bad_type, bad_value

HELP = "an interactive explorer in the browser: click a word, an answer or an action, see its map"
#: The models always served (--model adds more): the shipped shapes-world models.
DEFAULT_MODELS = ("shapes-captioner", "shapes-vqa", "shapes-c3d")
#: Colormaps offered on the page, those that mmexplain.render knows.
COLORMAP_CHOICES = ("jet", "turbo", "viridis", "inferno", "magma", "plasma", "hot", "gray")
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
MAX_PIXELS = 40_000_000
MB = 1 << 20
#: Inputs and results kept in memory (the oldest are dropped first).
KEEP = 64
BUDGET = 1 << 30
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: The Host headers a server bound to this machine answers.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


class RequestError(MMExplainError):
    """An error answered with an HTTP status (4xx) and the message as JSON."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", default=None,
                        help="a registered model to serve beside the shipped shapes models "
                        "(repeat for more; default: only those); with --weights DIR alone, "
                        "the folder's family")
    parser.add_argument("--weights", default=None,
                        help="local weight file or Hugging Face folder for the one --model "
                        "(as the caption / vqa / video commands take it)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=2026,
                        help="world seed of the generated scenes and clips (default 2026, "
                        "never seen in training)")
    parser.add_argument("--max-image-mb", type=float, default=8, help="largest image upload")
    parser.add_argument("--max-video-mb", type=float, default=32, help="largest video upload")
    parser.add_argument("--max-frames", type=int, default=128,
                        help="most video frames explained per request (default 128)")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ModuleNotFoundError as exc:
        raise InputError("serve: expected the serve extra to be installed (pip install -e "
                         "\".[serve]\"), received an environment without uvicorn") from exc
    for arg in ("port", "max_frames"):
        if getattr(args, arg) < 1:
            raise bad_value(f"--{arg.replace('_', '-')}", "a positive number", getattr(args, arg))
    app = create_app(extra_model=args.model, weights=args.weights, device=args.device,
                     seed=args.seed, limits=Limits(int(args.max_image_mb * MB),
                                                   int(args.max_video_mb * MB), args.max_frames),
                     allowed_hosts=LOOPBACK_HOSTS if args.host in LOOPBACK else None)
    if args.host not in LOOPBACK:
        print(f"note: listening on {args.host}: anyone who can reach this machine can use the "
              "explorer (default 127.0.0.1: this machine only)")
    print(f"mmexplain explorer: http://{args.host}:{args.port}/  (Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Limits:
    image_bytes: int = 8 * MB
    video_bytes: int = 32 * MB
    frames: int = 128


class Store:
    """Items under random ids: the newest ``keep`` of them, at most ``budget`` bytes of
    uploads and renderings together (thread-safe; the oldest go first)."""

    def __init__(self, what: str, keep: int = KEEP, budget: int = BUDGET) -> None:
        self.what, self.keep, self.budget = what, keep, budget
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, item: Any, size: int = 0) -> str:
        key = secrets.token_urlsafe(12)
        with self._lock:
            self._items[key] = (item, size)
            while len(self._items) > 1 and (len(self._items) > self.keep or sum(
                    n for _, n in self._items.values()) > self.budget):
                self._items.popitem(last=False)
        return key

    def get(self, key: Any) -> Any:
        with self._lock:
            item, _ = self._items.get(key, (None, 0)) if isinstance(key, str) else (None, 0)
        if item is None:
            raise RequestError(404, f"{self.what}: expected the id of an {self.what} this server "
                               f"holds (the newest {self.keep} are kept), received {key!r}")
        return item


@dataclass
class Model:
    """One loaded model: its adapter, the task it serves and the lock its calls take."""

    name: str
    tasks: tuple[str, ...]  # caption, vqa, video
    adapter: Any
    lock: threading.Lock = field(default_factory=threading.Lock)

    def view(self, layer: Any) -> Any:
        """The adapter split at ``layer`` (None: its own layer); parameters shared."""
        if layer in (None, "", self.adapter.layer):
            return self.adapter
        if not isinstance(layer, str):
            raise bad_type("layer", "a layer name", layer)
        return self.adapter.at_layer(layer)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "tasks": list(self.tasks), "layer": self.adapter.layer,
                "layers": list(self.adapter.layers),
                "weights": str(getattr(self.adapter, "weights_source", ""))}


def tasks_of(adapter: Any) -> tuple[str, ...]:
    """The explorer's tasks for a model, by its capabilities: caption, vqa (a generative
    VLM does both) or video."""
    from mmexplain.adapters.capabilities import offers

    found = offers(adapter)
    tasks = tuple(task for task, capability in (("caption", "caption"), ("vqa", "answer"))
                  if capability in found)
    if not tasks and "classify" in found and getattr(adapter, "clip_length", None):
        tasks = ("video",)
    if tasks:
        return tasks
    raise InputError(f"--model: expected a captioner, a VQA model or a video classifier, "
                     f"received {getattr(adapter, 'name', adapter)!r}, which offers "
                     f"{', '.join(found) or 'no capability'}")


def load_models(extra: str | list[str] | None, weights: str | None, device: str
                ) -> dict[str, Model]:
    """The shipped shapes models and the ``extra`` ones (``weights`` for the one extra
    model), each loaded once by the commands' loader (:func:`mmexplain.commands.build_adapter`,
    the folder's family from its config.json when only ``weights`` names a folder)."""
    from mmexplain.commands import _folder_family, build_adapter

    extra = [extra] if isinstance(extra, str) else list(extra or [])
    if weights is not None:
        if len(extra) > 1:
            raise bad_value("--weights", "the weights of one --model", f"{weights!r} for "
                            f"{len(extra)} models ({', '.join(extra)})", raw=True)
        spec = argparse.Namespace(model=extra[0] if extra else None, weights=weights)
        _folder_family(spec, None)
        if spec.model is None:
            raise bad_value("--model", "the registered model that --weights FILE is for",
                            None)
        extra = [spec.model]
    names = list(dict.fromkeys([*DEFAULT_MODELS, *extra]))
    adapters = {name: build_adapter(name, weights if name in extra else None, None, device)
                for name in names}
    return {name: Model(name, tasks_of(a), a) for name, a in adapters.items()}


@dataclass
class Input:
    """An image (H, W, 3) uint8 or a video's bytes, with the shapes world's truth if any."""

    kind: str  # image | video
    name: str  # shown only: the client's file name or "scene N"
    image: np.ndarray | None = None
    video: bytes | None = None
    truth: Any = None  # a shapes Scene or Clip


@dataclass
class Result:
    """What one explanation request found, for its overlays, masks and downloads."""

    shown: np.ndarray  # (H, W, 3) the image as the model saw it, or (N, H, W, 3) frames
    maps: torch.Tensor  # (K, h, w), or (K, N, h, w) per frame scaled to [0, 1] over the video
    masks: list[np.ndarray | None]  # per target: (H, W) or (N, H, W) ground truth
    peaks: list[Any]  # per target: (y, x), or per frame (y, x)
    npz: bytes
    mp4: bytes | None = None


# --------------------------------------------------------------------------- inputs


def _uploaded(data: bytes, name: str, read: Callable[[Path], Any], status: int = 415) -> Any:
    """``read`` of the bytes in a temporary file the server names; its InputError speaks of
    the client's file name, never the server's path (HTTP ``status``)."""
    with tempfile.TemporaryDirectory(prefix="mmexplain-serve-") as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        try:
            return read(path)
        except InputError as exc:
            raise RequestError(status, str(exc).replace(repr(str(path)), repr(name))
                               .replace(str(path), name).replace(tmp, "<temporary folder>")
                               ) from exc


def image_input(data: bytes, name: str) -> Input:
    """An uploaded image checked (a known format, at most MAX_PIXELS) and decoded by
    :func:`mmexplain.data.images.read_image`."""
    from PIL import Image, UnidentifiedImageError

    from mmexplain.data.images import read_image

    expected = f"a {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} image"
    try:
        with Image.open(io.BytesIO(data)) as im:
            found, size = im.format, im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise RequestError(415, f"image: expected {expected}, received {name!r} "
                           f"({len(data)} bytes), which is not an image file") from None
    if found not in IMAGE_FORMATS:
        raise RequestError(415, f"image: expected {expected}, received {name!r}, a {found} file")
    if size[0] * size[1] > MAX_PIXELS:
        raise RequestError(413, f"image: expected at most {MAX_PIXELS:,} pixels, received "
                           f"{name!r} of {size[0]} x {size[1]}")
    return Input("image", name, image=_uploaded(data, name, read_image))


def video_input(data: bytes, name: str) -> Input:
    """An uploaded video, checked by :func:`mmexplain.data.video.probe_video` (a container
    with a video stream); kept as bytes."""
    from mmexplain.data.video import probe_video

    info = _uploaded(data, name, probe_video)
    if info.size[0] * info.size[1] > MAX_PIXELS // 4:
        raise RequestError(413, f"video: expected frames of at most {MAX_PIXELS // 4:,} "
                           f"pixels, received {name!r} of {info.size[1]} x {info.size[0]}")
    return Input("video", name, video=data)


def scene_input(seed: int, index: int) -> Input:
    """Scene ``index`` of the shapes world, as an image, with its ground truth."""
    from mmexplain.data.shapes import ShapesWorld
    from mmexplain.render import to_uint8_image

    scene = ShapesWorld(seed=seed).image(index)
    return Input("image", f"scene {index}", image=to_uint8_image(torch.from_numpy(scene.image)),
                 truth=scene)


def clip_input(seed: int, index: int) -> Input:
    """Clip ``index`` of the shapes world as an MP4 (8 fps), with its ground truth."""
    from mmexplain.data.shapes import ShapesWorld
    from mmexplain.render import write_mp4

    clip = ShapesWorld(seed=seed).clip(index)
    frames = (torch.from_numpy(clip.video) * 255).round().byte().permute(1, 2, 3, 0).numpy()
    buf = io.BytesIO()
    write_mp4(frames, buf, fps=8)
    return Input("video", f"clip {index}", video=buf.getvalue(), truth=clip)


def truth_of(inp: Input) -> dict[str, Any] | None:
    """What the page shows of the shapes world's ground truth."""
    t = inp.truth
    if t is None:
        return None
    if inp.kind == "image":
        return {"caption": t.caption.text, "objects": [f"{o.color} {o.shape}" for o in t.objects],
                "questions": [{"question": q.question, "answer": q.answer} for q in t.qas]}
    actor = t.objects[t.actor]
    return {"action": t.action_name, "actor": f"{actor.color} {actor.shape}"}


# --------------------------------------------------------------------------- request fields


def text_field(body: dict[str, Any], name: str, required: bool = False) -> str | None:
    """A text field of a JSON request (None when absent or blank, unless required)."""
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_type(name, "a text", value)
    value = value.strip() if value else None
    if required and not value:
        raise bad_value(name, "a non-empty text", body.get(name))
    return value


def method_field(body: dict[str, Any]) -> str:
    from mmexplain.methods import list_methods

    method = body.get("method") or "gradcam"
    if method not in list_methods():
        raise bad_value("method", f"one of the registered methods ({', '.join(list_methods())})",
                        method)
    return method


def int_field(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_value(name, f"an integer in [{low}, {high}]", value)
    return value


# --------------------------------------------------------------------------- ground truth


def word_mask(scene: Any, word: str) -> np.ndarray | None:
    """(H, W) the objects of a shapes scene a colour or shape word names; None for others."""
    from mmexplain.data import shapes as W

    shape = {**{s: s for s in W.SHAPES}, **{p: s for s, p in W.SHAPE_PLURALS.items()}}.get(word)
    if scene is None or (word not in W.COLORS and shape is None):
        return None
    return scene.mask_of(i for i, o in enumerate(scene.objects) if word in (o.color, shape))


def _same_question(a: str, b: str) -> bool:
    def norm(q: str) -> str:
        return " ".join(q.lower().replace("?", " ?").split())

    return norm(a) == norm(b)


def answer_mask(scene: Any, question: str) -> tuple[np.ndarray | None, str | None]:
    """(the mask of the objects the answer is about, the true answer) where ``question``
    is one of the scene's questions about objects; (None, truth or None) otherwise."""
    for qa in getattr(scene, "qas", ()):
        if _same_question(qa.question, question):
            return (scene.mask_of(qa.answer_refs) if qa.answer_refs else None), qa.answer
    return None, None


def fit_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (…, H, W) bool mask at ``size`` (nearest)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    m = torch.from_numpy(mask).float().reshape(-1, 1, *mask.shape[-2:])
    m = torch.nn.functional.interpolate(m, size=tuple(size), mode="nearest")
    return m.reshape(*mask.shape[:-2], *size).bool().numpy()


def pointing(maps: torch.Tensor, masks: list[np.ndarray | None], size: tuple[int, int],
             truth_side: int) -> tuple[list[Any], list[Any], list[np.ndarray | None]]:
    """Pointing game (Grad-CAM sec. 4.3) of maps (K, [N,] h, w) at the picture's ``size``:
    (hits per target, or per frame; peaks (y, x); the masks at that size). The tolerance is
    the shapes world's, scaled from its ``truth_side`` pixels to ``size``."""
    from mmexplain import metrics
    from mmexplain.engine import resize_grid
    from mmexplain.tasks import protocols as P

    up = P.evidence(resize_grid(maps, size))  # (K, [N,] H, W)
    flat = up.flatten(-2).argmax(-1)
    peaks = torch.stack([flat // size[1], flat % size[1]], -1).tolist()
    tolerance = P.SHAPES_TOLERANCE * size[0] / truth_side
    hits, fitted = [], []
    for k, mask in enumerate(masks):
        fitted.append(None if mask is None else fit_mask(mask, size))
        hits.append(None if mask is None else metrics.pointing_game(
            up[k], torch.from_numpy(fitted[-1]), tolerance=tolerance).tolist())
    return hits, peaks, fitted


# --------------------------------------------------------------------------- explanations


def npz_bytes(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def image_result(adapter: Any, inp: Input, expl: Any, labels: list[str], shown: np.ndarray,
                 masks: list[np.ndarray | None], extra: dict[str, Any]
                 ) -> tuple[Result, dict[str, Any]]:
    """The stored result and the JSON of an image explanation: the engine's maps (K, h, w)
    as they are, their scores, the pointing hits where there is ground truth; the .npz
    holds what the caption / vqa commands write."""
    maps = expl.maps.detach().float().cpu()[0]  # (K, h, w)
    scores = expl.scores.detach().float().cpu()[0]
    side = inp.truth.image.shape[-1] if inp.truth is not None else shown.shape[0]
    hits, peaks, fitted = pointing(maps, masks, shown.shape[:2], side)
    npz = npz_bytes(maps=maps[None].numpy(), scores=scores[None].numpy(), labels=np.array(labels),
                    image=shown, layer=str(expl.layer), method=expl.method,
                    weights_source=str(getattr(adapter, "weights_source", "")), **extra)
    info = {"labels": labels, "scores": scores.tolist(), "maps": maps.tolist(),
            "grid": list(maps.shape[1:]), "pointing": hits, "layer": str(expl.layer),
            "method": expl.method, "size": list(shown.shape[:2])}
    return Result(shown, maps, fitted, peaks, npz), info


def explain_caption_request(model: Model, inp: Input, body: dict[str, Any], limits: Limits
                            ) -> tuple[Result, dict[str, Any]]:
    """The model's own caption (or the one typed, scored), one map per word: the caption
    command's :func:`~mmexplain.tasks.caption.explain_caption` with words="all"."""
    from mmexplain.tasks.caption import explain_caption

    caption, method = text_field(body, "caption"), method_field(body)
    with model.lock:
        adapter = model.view(body.get("layer"))
        x, shown, context = adapter.prepare_image(inp.image, None)
        expl, labels = explain_caption(adapter, x, caption, "all", method, max_len=20,
                                       context=context)
    text = caption or " ".join(labels)
    masks = [word_mask(inp.truth, w) for w in labels]
    result, info = image_result(adapter, inp, expl, labels, shown, masks, {"caption": text})
    return result, {**info, "caption": text, "own": caption is None}


def explain_vqa_request(model: Model, inp: Input, body: dict[str, Any], limits: Limits
                        ) -> tuple[Result, dict[str, Any]]:
    """The model's answer and any forced ones, one map each (the vqa command's
    :func:`~mmexplain.tasks.vqa.explain_vqa`)."""
    from mmexplain.tasks.vqa import explain_vqa

    question, method = text_field(body, "question", required=True), method_field(body)
    forced = body.get("answers") or []
    if not isinstance(forced, list) or not all(isinstance(a, str) and a.strip() for a in forced):
        raise bad_type("answers", "a list of answers (texts)", forced)
    with model.lock:
        adapter = model.view(body.get("layer"))
        x, shown, _ = adapter.prepare_image(inp.image, question)
        own = [(str(a), float(p)) for a, p in adapter.answer(x, question, top=3)[0]
               if str(a).strip()]
        answers = [a for a, _ in own[:1]]
        answers += [a.strip() for a in forced if a.strip() not in answers]
        if not answers:
            raise bad_value("answers", "answers to explain (the model gave none)", None)
        expl, labels = explain_vqa(adapter, x, question, answers, method)
    mask, truth = answer_mask(inp.truth, question)
    result, info = image_result(adapter, inp, expl, labels, shown, [mask] * len(labels),
                                {"question": question})
    return result, {**info, "question": question,
                    "own": [{"answer": a, "score": p} for a, p in own],
                    "true_answer": truth}


def _video_arrays(saved: Any) -> dict[str, Any]:
    """From the video command's .npz: the per-frame maps scaled over the whole video per
    target (as its MP4 shows them), the per-frame labels and importance, the actions."""
    from mmexplain.commands import _nearest_windows

    maps = torch.from_numpy(saved["frame_maps"]).float()  # (K, N, h, w)
    lo = maps.flatten(1).amin(dim=1).view(-1, 1, 1, 1)
    span = maps.flatten(1).amax(dim=1).view(-1, 1, 1, 1) - lo
    maps = torch.where(span > 0, (maps - lo) / span.clamp(min=1e-30), torch.zeros_like(maps))
    labels, scores = saved["labels"].tolist(), saved["scores"].tolist()  # (windows, K)
    nearest = _nearest_windows(saved["frame_indices"].tolist(), maps.shape[1])
    per_frame = [[labels[w][k] if w >= 0 else "" for w in nearest] for k in range(maps.shape[0])]
    means: dict[str, list[float]] = {}
    for names, values in zip(labels, scores):
        for name, value in zip(names, values):
            means.setdefault(name, []).append(value)
    actions = sorted(((n, sum(v) / len(v)) for n, v in means.items()), key=lambda a: -a[1])
    return {"maps": maps, "frame_labels": per_frame, "fps": float(saved["fps"]),
            "importance": saved["frame_importance"].tolist(),
            "actions": [{"action": n, "mean_score": s} for n, s in actions[:8]]}


def video_args(**options: Any) -> argparse.Namespace:
    """The video command's arguments: its parser's defaults, with ``options``."""
    from mmexplain.commands import COMMANDS

    parser = argparse.ArgumentParser()
    COMMANDS["video"].add_arguments(parser)
    args = parser.parse_args(["input"])
    for name, value in options.items():
        if not hasattr(args, name):
            raise AttributeError(f"the video command has no option {name!r}")
        setattr(args, name, value)
    return args


def video_cmap(body: dict[str, Any]) -> dict[str, Any]:
    """The colormap of the overlay MP4, where the video command takes one (--cmap)."""
    cmap = text_field(body, "cmap") or "jet"
    if cmap not in colormaps():
        raise bad_value("cmap", f"one of {', '.join(colormaps())}", cmap)
    return {"cmap": cmap} if hasattr(video_args(), "cmap") else {}


def explain_video_request(model: Model, inp: Input, body: dict[str, Any], limits: Limits
                          ) -> tuple[Result, dict[str, Any]]:
    """The video command's work on the first ``frames`` frames: sliding windows explained,
    stitched per frame, its overlay MP4 and .npz (``_explain_video``); each window's top
    3 actions, or the action asked for."""
    from mmexplain.commands import _explain_video
    from mmexplain.data.video import iter_frames

    action, method = text_field(body, "action"), method_field(body)
    frames = int_field(body, "frames", limits.frames, 1, limits.frames)
    adapter = model.view(body.get("layer"))
    window = getattr(adapter, "clip_length", None) or 16
    if frames < window:
        raise bad_value("frames", f"at least one window of {window} frames", frames)
    args = video_args(max_windows=frames // window, sequential=True, actions=action,
                      method=method, top=1 if action else 3, **video_cmap(body))

    def work(path: Path) -> tuple[dict[str, Any], bytes, bytes, np.ndarray]:
        with model.lock:
            record = _explain_video(args, adapter, path, path.parent / "overlay", window)
        shown = np.stack(list(iter_frames(path, stop=record["frames"],
                                          transform=adapter.preprocess.frame)))
        return record, Path(record["mp4"]).read_bytes(), Path(record["npz"]).read_bytes(), shown

    record, mp4, npz, shown = _uploaded(inp.video, inp.name, work, status=400)
    with np.load(io.BytesIO(npz)) as saved:
        found = _video_arrays(saved)
        layer, method = str(saved["layer"]), str(saved["method"])
    maps = found.pop("maps")
    masks: list[np.ndarray | None] = [None] * maps.shape[0]
    if inp.truth is not None:  # the actor's masks, frame by frame
        actor = inp.truth.objects[inp.truth.actor].masks[:maps.shape[1]]
        masks = [actor] * maps.shape[0]
    side = inp.truth.video.shape[-1] if inp.truth is not None else shown.shape[1]
    hits, peaks, fitted = pointing(maps, masks, shown.shape[1:3], side)
    info = {**found, "frames": int(maps.shape[1]), "windows": record["windows"],
            "grid": list(maps.shape[2:]), "labels": [action or f"top {k + 1} of each window"
                                                     for k in range(maps.shape[0])],
            "pointing": hits, "layer": layer, "method": method, "size": list(shown.shape[1:3])}
    return Result(shown, maps, fitted, peaks, npz, mp4), info


EXPLAINERS = {"caption": explain_caption_request, "vqa": explain_vqa_request,
              "video": explain_video_request}


# --------------------------------------------------------------------------- pictures


def colormaps() -> list[str]:
    """The names of COLORMAP_CHOICES that mmexplain.render knows."""
    from mmexplain.render import colormap

    names = []
    for name in COLORMAP_CHOICES:
        try:
            colormap(name)
        except MMExplainError:
            continue
        names.append(name)
    return names


def _frame_and_target(result: Result, k: Any, frame: Any) -> tuple[int, int | None]:
    video = result.shown.ndim == 4
    if not isinstance(k, int) or not 0 <= k < result.maps.shape[0]:
        raise RequestError(404, f"target: expected a target number in [0, "
                           f"{result.maps.shape[0]}), received {k!r}")
    if not video:
        return k, None
    n = result.shown.shape[0]
    if not isinstance(frame, int) or not 0 <= frame < n:
        raise bad_value("frame", f"a frame number in [0, {n})", frame)
    return k, frame


def overlay_png(result: Result, k: Any, cmap: str, alpha: float, frame: Any = None) -> bytes:
    """Target ``k``'s map over the picture as the model saw it (render.overlay; a video
    frame's map is scaled over the whole video, as in the video command's MP4)."""
    from mmexplain.render import overlay, png_bytes

    k, f = _frame_and_target(result, k, frame)
    if f is None:
        return png_bytes(overlay(result.shown, result.maps[k], alpha, cmap=cmap))
    return png_bytes(overlay(result.shown[f], result.maps[k, f], alpha, cmap=cmap,
                             normalize=False))


def mask_png(result: Result, k: Any, frame: Any = None) -> bytes:
    """The picture with target ``k``'s ground-truth mask lit (the rest dimmed) and the
    map's peak marked in red: what the pointing game judged."""
    from mmexplain.render import png_bytes

    k, f = _frame_and_target(result, k, frame)
    mask, peak = result.masks[k], result.peaks[k]
    if mask is None:
        raise RequestError(404, f"target: expected a target with ground truth, received {k} "
                           "(this input has no mask for it)")
    image = result.shown if f is None else result.shown[f]
    mask, (y, x) = (mask, peak) if f is None else (mask[f], peak[f])
    out = np.where(mask[..., None], image, (image * 0.3).astype(np.uint8)).copy()
    out[max(y - 2, 0):y + 3, x] = (255, 0, 0)
    out[y, max(x - 2, 0):x + 3] = (255, 0, 0)
    return png_bytes(out)


# --------------------------------------------------------------------------- the web app

#: Every response: no script, style or media from elsewhere; no sniffing; no framing.
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
           "media-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-store"}
STATIC = {"/": ("serve.html", "text/html; charset=utf-8"),
          "/static/serve.js": ("serve.js", "text/javascript; charset=utf-8"),
          "/static/serve.css": ("serve.css", "text/css; charset=utf-8")}


class Explorer:
    """The app's state: the models, the inputs and results (under random ids), the limits."""

    def __init__(self, models: dict[str, Model], limits: Limits, seed: int) -> None:
        self.models, self.limits, self.seed = models, limits, seed
        self.inputs, self.results = Store("input"), Store("result")

    def model(self, name: Any, task: str | None = None) -> Model:
        model = self.models.get(name) if isinstance(name, str) else None
        if model is None or (task is not None and task not in model.tasks):
            names = [m.name for m in self.models.values() if task is None or task in m.tasks]
            raise bad_value("model", f"one of the models served{f' for {task}' if task else ''}"
                            f" ({', '.join(names)})", name)
        return model

    def describe(self) -> dict[str, Any]:
        from mmexplain.methods import get_method, list_methods

        return {"models": [m.describe() for m in self.models.values()],
                "methods": [{"name": m, "label": get_method(m).label or m}
                            for m in list_methods()],
                "colormaps": colormaps(), "seed": self.seed,
                "limits": {"image_mb": self.limits.image_bytes / MB,
                           "video_mb": self.limits.video_bytes / MB,
                           "frames": self.limits.frames}}

    def add_input(self, inp: Input) -> dict[str, Any]:
        key = self.inputs.add(inp, len(inp.video or b"") + getattr(inp.image, "nbytes", 0))
        return {"input": key, "kind": inp.kind, "name": inp.name, "truth": truth_of(inp)}

    def explain(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise bad_type("request", "a JSON object", body)
        inp: Input = self.inputs.get(body.get("input"))
        task = body.get("task")
        if task not in EXPLAINERS:
            raise bad_value("task", f"one of {', '.join(EXPLAINERS)}", task)
        if (task == "video") != (inp.kind == "video"):
            raise bad_value("task", f"a task for this {inp.kind} "
                            f"({'video' if inp.kind == 'video' else 'caption or vqa'})", task)
        model = self.model(body.get("model"), task)
        result, info = EXPLAINERS[task](model, inp, body, self.limits)
        size = result.shown.nbytes + result.maps.numel() * 4 + len(result.npz) + len(result.mp4
                                                                                    or b"")
        return {**info, "result": self.results.add(result, size), "task": task,
                "model": model.name,
                "truth": truth_of(inp)}


def _response(content: Any, status: int = 200, media: str | None = None,
              download: str | None = None) -> Any:
    from starlette.responses import JSONResponse, Response

    headers = dict(HEADERS)
    if download:
        headers["Content-Disposition"] = f'attachment; filename="{download}"'
    if media is None:
        return JSONResponse(content, status_code=status, headers=headers)
    return Response(content, status_code=status, media_type=media, headers=headers)


def ranged(data: bytes, header: str | None, media: str) -> Any:
    """``data``, or the one byte range ``header`` asks for (HTTP 206: browsers seek in a
    video only where its server answers ranges)."""
    import re

    found = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if not found or found.groups() == ("", ""):
        response = _response(data, media=media)
    else:
        start, end = found.groups()
        first = int(start) if start else max(len(data) - int(end), 0)
        last = min(int(end), len(data) - 1) if start and end else len(data) - 1
        if first > last:
            response = _response(b"", 416, media=media)
            response.headers["Content-Range"] = f"bytes */{len(data)}"
            return response
        response = _response(data[first:last + 1], 206, media=media)
        response.headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
    response.headers["Accept-Ranges"] = "bytes"
    return response


def same_origin(request: Any) -> None:
    """A POST from another site's page (its Origin is not this server) is refused: other
    pages cannot make this server work for them (cross-site request forgery)."""
    from urllib.parse import urlsplit

    origin = request.headers.get("origin")
    if request.method == "POST" and origin and urlsplit(origin).netloc != request.headers.get(
            "host"):
        raise RequestError(403, f"origin: expected a request from this server's page "
                           f"({request.headers.get('host')}), received one from {origin!r}")


def guarded(handler: Callable[..., Any]) -> Callable[..., Any]:
    """A handler whose errors answer JSON: a RequestError its status, an input error 400,
    anything else 500 with its type and message; the server goes on serving."""
    import functools
    import logging

    @functools.wraps(handler)
    async def wrapper(request: Any) -> Any:
        try:
            same_origin(request)
            return await handler(request)
        except RequestError as exc:
            return _response({"error": str(exc)}, exc.status)
        except MMExplainError as exc:
            return _response({"error": str(exc)}, 400)
        except Exception as exc:  # the request fails; the server does not
            logging.getLogger("mmexplain.serve").exception("request %s failed", request.url.path)
            return _response({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    return wrapper


async def _json_body(request: Any) -> dict[str, Any]:
    import json

    raw = await request.body()
    if len(raw) > 64 * 1024:
        raise RequestError(413, f"request: expected a JSON body of at most 64 KiB, received "
                           f"{len(raw)} bytes")
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise RequestError(400, f"request: expected a JSON object, received invalid JSON "
                           f"({exc})") from None
    if not isinstance(body, dict):
        raise bad_type("request", "a JSON object", body)
    return body


async def _upload(request: Any, kind: str, limit: int) -> tuple[bytes, str]:
    """The bytes and the client's name of the one file of a multipart upload (field
    ``file``), refused past ``limit`` bytes before it is read where the length is known."""
    from starlette.datastructures import UploadFile

    too_big = (f"{kind}: expected a file of at most {limit / MB:g} MB, received ")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + 64 * 1024:
        raise RequestError(413, too_big + f"{int(length) / MB:.1f} MB")
    try:
        form = await request.form(max_files=1, max_fields=4, max_part_size=64 * 1024)
    except Exception as exc:  # malformed multipart, too many parts
        raise RequestError(400, f"{kind}: expected a multipart form with one file in the "
                           f"field 'file', received a request the form parser refused ({exc})"
                           ) from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise RequestError(400, f"{kind}: expected a multipart form with one file in the "
                           f"field 'file', received the fields {sorted(form.keys())}")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        size = upload.size if upload.size is not None else len(data)
        raise RequestError(413, too_big + f"{name_of(upload)!r} of {size / MB:.3g} MB")
    return data, name_of(upload)


def name_of(upload: Any) -> str:
    """The client's file name, for messages only (its last part, at most 200 characters)."""
    return Path(upload.filename or "upload").name[:200] or "upload"


def create_app(extra_model: str | None = None, weights: str | None = None, device: str = "cpu",
               seed: int = 2026, limits: Limits | None = None,
               models: dict[str, Model] | None = None,
               allowed_hosts: tuple[str, ...] | None = None) -> Any:
    """The explorer as a Starlette app (its Explorer state as ``app.state.explorer``);
    ``allowed_hosts``: the Host headers it answers (None: any)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.routing import Route

    ex = Explorer(models or load_models(extra_model, weights, device), limits or Limits(), seed)

    @guarded
    async def static(request: Any) -> Any:
        name, media = STATIC[request.url.path]
        return _response((resources.files("mmexplain") / "static" / name).read_bytes(), media=media)

    async def no_icon(request: Any) -> Any:
        return _response(b"", 204, media="image/x-icon")

    @guarded
    async def api_models(request: Any) -> Any:
        return _response(ex.describe())

    @guarded
    async def generate(request: Any) -> Any:
        body = await _json_body(request)
        index = int_field(body, "index", secrets.randbelow(1_000_000), 0, 10**9)
        make = {"scene": scene_input, "clip": clip_input}.get(request.path_params["kind"])
        if make is None:
            raise RequestError(404, "generate: expected /api/generate/scene or /api/generate/clip")
        return _response(ex.add_input(await run_in_threadpool(make, ex.seed, index)))

    @guarded
    async def upload(request: Any) -> Any:
        kind = request.path_params["kind"]
        if kind not in ("image", "video"):
            raise RequestError(404, "upload: expected /api/upload/image or /api/upload/video")
        limit = ex.limits.image_bytes if kind == "image" else ex.limits.video_bytes
        data, name = await _upload(request, kind, limit)
        read = image_input if kind == "image" else video_input
        return _response(ex.add_input(await run_in_threadpool(read, data, name)))

    @guarded
    async def input_png(request: Any) -> Any:
        from mmexplain.render import png_bytes

        inp = ex.inputs.get(request.path_params["key"])
        if inp.image is None:
            raise RequestError(404, "input: expected an image input, received a video's id")
        return _response(png_bytes(inp.image), media="image/png")

    @guarded
    async def explain(request: Any) -> Any:
        return _response(await run_in_threadpool(ex.explain, await _json_body(request)))

    app = Starlette(routes=[
        *[Route(path, static) for path in STATIC],
        Route("/favicon.ico", no_icon),
        Route("/api/models", api_models),
        Route("/api/generate/{kind:str}", generate, methods=["POST"]),
        Route("/api/upload/{kind:str}", upload, methods=["POST"]),
        Route("/api/input/{key:str}.png", input_png),
        Route("/api/explain", explain, methods=["POST"]),
        *result_routes(ex)])
    if allowed_hosts:  # a DNS name rebound to 127.0.0.1 by another site is refused
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.state.explorer = ex
    return app


def result_routes(ex: Explorer) -> list[Any]:
    """The overlay and mask PNGs of a result's targets (a video's: of one frame), its .npz
    and, for a video, its overlay MP4."""
    from starlette.concurrency import run_in_threadpool
    from starlette.routing import Route

    def query(request: Any) -> tuple[Result, int, Any]:
        result = ex.results.get(request.path_params["key"])
        frame = request.query_params.get("frame")
        frame = int(frame) if frame is not None and frame.isdigit() else frame
        return result, request.path_params["k"], frame

    @guarded
    async def overlay(request: Any) -> Any:
        result, k, frame = query(request)
        cmap = request.query_params.get("cmap", "jet")
        try:
            alpha = float(request.query_params.get("alpha", "0.5"))
        except ValueError:
            raise bad_value("alpha", "a number in [0, 1]", request.query_params["alpha"]) from None
        png = await run_in_threadpool(overlay_png, result, k, cmap, alpha, frame)
        return _response(png, media="image/png")

    @guarded
    async def mask(request: Any) -> Any:
        result, k, frame = query(request)
        return _response(await run_in_threadpool(mask_png, result, k, frame), media="image/png")

    @guarded
    async def download(request: Any) -> Any:
        result = ex.results.get(request.path_params["key"])
        if request.path_params["ext"] == "npz":
            return _response(result.npz, media="application/octet-stream",
                             download="mmexplain.npz")
        if request.path_params["ext"] == "mp4" and result.mp4 is not None:
            return ranged(result.mp4, request.headers.get("range"), "video/mp4")
        raise RequestError(404, "download: expected .npz, or .mp4 for a video's result")

    return [Route("/api/result/{key:str}/overlay/{k:int}.png", overlay),
            Route("/api/result/{key:str}/mask/{k:int}.png", mask),
            Route("/api/result/{key:str}/download.{ext:str}", download)]


__all__ = ["HELP", "Explorer", "Limits", "Model", "add_arguments", "create_app", "load_models",
           "run"]
