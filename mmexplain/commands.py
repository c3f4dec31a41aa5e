"""The model commands of ``mmexplain``: caption, vqa, video, classify.

    mmexplain classify cat_dog.png --classes "tabby,boxer"           # resnet18
    mmexplain video armwrestling.mp4 --model r3d_18 --stride 32      # sliding 16-frame windows
    mmexplain caption photo.jpg --words visual
    mmexplain vqa photo.jpg --question "what color is the circle ?" --answers red,blue

Default models: ``resnet18`` (classify), ``r3d_18`` (video), and for caption
and vqa the shipped ``shapes-captioner`` / ``shapes-vqa``; while those cannot
be built (not registered, weights not trained yet) a random-weight
``show-tell`` / ``vqa-lstm`` with a tiny CNN and the shapes world's vocabulary
stands in, and the command says so. ``--weights DIR`` (a Hugging Face model
folder, as ``save_pretrained`` writes it) loads that model by path, its family
read from the folder's config.json when ``--model`` is not given
(:mod:`mmexplain.adapters.families`); commands ask the model for the capability
they need (:mod:`mmexplain.adapters.capabilities`) and name it when it lacks it.

Every command takes ``--model`` (a registry name), ``--weights`` (a local
file; "random" for random weights; default: the model's own lookup, e.g. the
torch cache), ``--layer``, ``--method`` (any registered method), ``--out DIR`` and
``--device``, prints which weights were used and what it wrote, and writes the
maps as ``.npz`` (the engine's raw maps (B, K, *grid), their scores and labels)
beside the pictures:

- classify, caption, vqa: one overlay PNG per explained target
  ``<stem>_<model>_<method>_<k>_<label>.png`` and ``<stem>_<model>_<method>.npz``;
- video: for each video (files, folders, globs) ``<name>_<model>_<method>.mp4``
  with every frame of the video once, at its fps: the frame as the model saw it
  with its stitched map (the mean over the sliding windows covering it, the tail
  window included; one panel per target, normalised over the whole video) over a
  strip of each frame's share of the explanation; the ``.npz`` holds ``maps``
  (N, K, T', H', W') per window with ``frame_indices`` (N, window), ``scores``,
  ``classes``, ``labels``, and ``frame_maps`` (K, frames, H', W'),
  ``frame_windows``, ``frame_importance``; one JSON line per video on stdout and
  in ``records.rank{R}.jsonl`` with ``summary.json`` (:mod:`mmexplain.runs`: sharded
  under torchrun, ``--resume``). Frames are decoded as the windows need them, in a
  worker thread; existing outputs are refused unless ``--overwrite`` / ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmexplain.data.images import read_image
from mmexplain.engine import device_of
from mmexplain.errors import InputError, MMExplainError, bad_value

# The shipped shapes-world models, and the random-weight stand-ins used until they exist.
SHIPPED = {"caption": "shapes-captioner", "vqa": "shapes-vqa"}
FALLBACK = {"caption": "show-tell", "vqa": "vqa-lstm"}


# --------------------------------------------------------------------------- shared pieces


SIZE_HELP = "image side in pixels (default: the model's, else 224)"
#: Frames per second of the overlay MP4 of a clip a vision-language model read (a few
#: frames spread over the video: shown slowly).
CLIP_FPS = 2


def _add_common(parser: argparse.ArgumentParser, default_model: str | None,
                image: bool = False, size: str | None = None) -> None:
    """The options every model command takes (``image``: and its IMAGE argument first;
    ``size``: the help of its --size)."""
    if image:
        parser.add_argument("input", metavar="IMAGE", help="image file")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace this run's outputs in --out (default: refuse, naming "
                            "them)")
    if size is not None:
        _add_size(parser, size)
    shown = default_model or "the shipped model, else a random-weight stand-in"
    parser.add_argument("--model", default=default_model,
                        help=f"registered adapter name (default: {shown}); "
                        "see mmexplain.adapters.list_adapters()")
    parser.add_argument("--weights", default=None,
                        help="local weight file; 'random' for random weights (default: the "
                        "model's own lookup, e.g. the torch cache, else random)")
    parser.add_argument("--layer", default=None, help="target layer (default: the model's)")
    from mmexplain.methods import list_methods

    parser.add_argument("--method", choices=list_methods(), default="gradcam",
                        help="a registered method (mmexplain.methods.list_methods())")
    parser.add_argument("--out", default=None,
                        help="output folder (default: mmexplain-out/<command>)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights "
                        "(--weights random, or no weight file found): two runs explain the "
                        "same model (default %(default)s)")
    parser.add_argument("--cmap", default="jet", type=_colormap_name,
                        help="the overlays' colormap: any matplotlib colormap name, e.g. jet "
                        "(default, the papers'), viridis, inferno, gray")


def _colormap_name(name: str) -> str:
    """--cmap's check at parse time: a matplotlib colormap name (the error lists close names)."""
    from mmexplain.render import colormap

    try:
        colormap(name)
    except MMExplainError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def _add_size(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--size", type=int, default=None, help=help)


def _split(text: str | None) -> list[str] | None:
    """'a,b' -> ['a', 'b'] (None stays None)."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def _slug(text: str) -> str:
    """A file-name part; "+" becomes "p" so that gradcam++ never collides with gradcam."""
    text = text.replace("+", "p")
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "target"


def _out_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out or f"mmexplain-out/{args.command}")
    if out.exists() and not out.is_dir():
        raise bad_value("--out", "a folder to write into", f"{str(out)!r}, which is a file",
                        raw=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_adapter(name: str, weights: str | None, layer: str | None, device: str,
                  seed: int = 0, **options: Any) -> Any:
    """``get_adapter(name, ...)`` with the CLI's weights convention and clear option errors.

    ``options`` left as None are not passed (each model keeps its defaults). Random
    weights are drawn from ``seed`` without touching the global RNG (two runs of
    ``--weights random`` explain the same model); the command says which weights it used,
    so the library's random-weights warning is not repeated.
    """
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.filterwarnings("ignore", message=r".*: its maps show how the method works")
        return _build_adapter(name, weights, layer, device, **options)


def _build_adapter(name: str, weights: str | None, layer: str | None, device: str,
                   **options: Any) -> Any:
    from mmexplain.adapters import get_adapter

    kwargs = {k: v for k, v in options.items() if v is not None}
    folder = weights is not None and weights != "random" and Path(weights).is_dir()
    if folder:  # a Hugging Face model folder: the adapters of its family load it by path
        from mmexplain.adapters.families import check_family

        check_family(weights, name, arg="--weights")
        kwargs["path"] = weights
    elif weights is not None:
        if weights != "random" and Path(weights).is_file():
            from mmexplain.adapters.weights import check_weight_file

            check_weight_file(weights, arg="--weights")
        kwargs["weights"] = False if weights == "random" else weights
    if layer is not None:
        kwargs["layer"] = layer
    try:
        adapter = get_adapter(name, **kwargs)
    except InputError as exc:
        if folder and str(exc).startswith("path: "):  # the folder is what --weights named
            raise InputError(f"--weights: {str(exc)[len('path: '):]}") from exc
        raise
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        bad = re.search(r"argument '(\w+)'", str(exc))
        if bad and bad.group(1) == "path":
            raise InputError(f"--weights: expected a weight file for model {name!r} (folders "
                             f"are for Hugging Face models), received the folder {weights!r}"
                             ) from exc
        option = "--" + (bad.group(1).replace("_", "-") if bad else "?")
        raise InputError(f"{option}: expected an option that model {name!r} takes, received "
                         f"{option} for {name!r}, which has no such setting") from exc
    return adapter.to(check_device(device))


def check_device(device: str) -> torch.device:
    """A torch device this machine has, or an InputError naming --device (was a raw
    RuntimeError 'Found no NVIDIA driver' on a machine without a GPU)."""
    try:
        device_ = torch.device(device)
    except RuntimeError as exc:
        raise bad_value("--device", "a torch device such as cpu or cuda", device) from exc
    if device_.type == "cuda" and not torch.cuda.is_available():
        raise bad_value("--device", "a device this machine has (no CUDA GPU is available "
                        "here: use --device cpu)", device)
    if device_.type == "cuda" and device_.index is not None and \
            device_.index >= torch.cuda.device_count():
        raise bad_value("--device", f"one of the {torch.cuda.device_count()} CUDA devices "
                        f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})", device)
    return device_


def _weights_line(adapter: Any) -> str:
    return f"weights: {getattr(adapter, 'weights_source', 'unknown')}"


def _folder_family(args: argparse.Namespace, task: str) -> bool:
    """With ``--weights DIR`` (a Hugging Face model folder) and no ``--model``, the
    model is the adapter of the folder's family (config.json); True for a folder."""
    if args.weights is None or args.weights == "random":
        return False
    if not Path(args.weights).exists():
        raise InputError(f"--weights: expected a weight file or a Hugging Face model folder, "
                         f"received {args.weights!r}: there is no such file or folder")
    if not Path(args.weights).is_dir():
        return False
    if args.model is None:
        from mmexplain.adapters.families import family_of

        args.model = family_of(args.weights, task=task, arg="--weights")
    return True


def _capable(adapter: Any, capability: str, command: str) -> Any:
    """``adapter`` if it offers ``capability``, else the InputError naming it."""
    from mmexplain.adapters import capabilities

    proto = capabilities.CAPABILITIES[capability][0]
    return capabilities.require(adapter, proto, f"mmexplain {command}")


def _prepared(adapter: Any, image: np.ndarray, prompt: str | None, size: int | None
              ) -> tuple[Any, np.ndarray, dict[str, Any]]:
    """The model's ``prepare_image`` (with ``--size`` where one was given)."""
    extra = {"size": size} if size is not None else {}
    return adapter.prepare_image(image, prompt, **extra)


def _read_image(args: argparse.Namespace) -> np.ndarray:
    """The IMAGE argument read (its size kept for :func:`_warn_small`)."""
    image = read_image(args.input)
    args.image_size = tuple(image.shape[:2])
    return image


def _warn_small(args: argparse.Namespace, grid: Sequence[int], layer: str,
                seen: Sequence[int]) -> None:
    """A warning when the image has fewer pixels than the map has cells (a 1 x 1 image
    was upsampled to the model's size without a word)."""
    size = getattr(args, "image_size", None)
    if size is not None and (size[0] < grid[0] or size[1] < grid[1]):
        warnings.warn(f"image: {args.input!r} is {size[0]} x {size[1]} pixels, fewer than the "
                      f"{grid[0]} x {grid[1]} cells of the map at layer {layer!r}: it was "
                      f"upsampled to {seen[0]} x {seen[1]} and the map shows the model's view "
                      "of an upsampled blur", UserWarning, stacklevel=2)


def _image_stem(args: argparse.Namespace) -> str:
    """The name every output of an image command starts with."""
    return f"{Path(args.input).stem}_{_slug(args.model)}_{_slug(args.method)}"


def _refuse_written(args: argparse.Namespace) -> None:
    """Before the model runs: an image command's outputs already in --out are an error
    naming them unless --overwrite (another folder's image of the same name too)."""
    out, stem = _out_dir(args), _image_stem(args)
    if not getattr(args, "overwrite", False):
        existing = sorted(out.glob(f"{stem}.npz")) + sorted(out.glob(f"{stem}_*"))
        _written(out, [f.name for f in existing], "--overwrite")


def _written(out: Path, existing: Sequence[str], instead: str) -> None:
    """The InputError of a run that would replace ``existing`` outputs in ``out``."""
    if existing:
        raise InputError(f"--out: expected a folder without this run's outputs (or "
                         f"{instead}), received {str(out)!r}, which holds {len(existing)} of "
                         f"them, e.g. {existing[0]!r}")


def _write_image_results(args: argparse.Namespace, adapter: Any, expl: Any, labels: Sequence[str],
                         shown: np.ndarray, extra: dict[str, Any]) -> int:
    """One overlay PNG per target (for a clip an MP4: each frame with its tubelet's map)
    and the .npz of the maps; prints what it wrote."""
    from mmexplain.render import overlay, overlay_clip, save_png, write_mp4

    out, stem = _out_dir(args), _image_stem(args)
    maps = expl.maps.detach().float().cpu()  # (1, K, h, w), a clip's (1, K, t', h, w)
    scores = expl.scores.detach().float().cpu()
    if shown.ndim == 3:
        _warn_small(args, maps.shape[-2:], expl.layer, shown.shape[:2])
    if shown.ndim == 4:
        frame_maps = adapter.frame_maps(maps, shown.shape[0])  # (1, K, T, h, w)
        extra = {**extra, "frame_maps": frame_maps.numpy(),
                 "frame_indices": np.array(getattr(args, "frame_indices", []))}
    for k, label in enumerate(labels):
        name = out / f"{stem}_{k}_{_slug(label)}"
        if shown.ndim == 4:
            path = name.with_suffix(".mp4")
            write_mp4(overlay_clip(shown, frame_maps[0, k], cmap=args.cmap), path, fps=CLIP_FPS)
        else:
            path = save_png(overlay(shown, maps[0, k], cmap=args.cmap), name.with_suffix(".png"))
        print(f"{label}: score {float(scores[0, k]):.4g} -> {path}")
    npz = out / f"{stem}.npz"
    np.savez(npz, maps=maps.numpy(), scores=scores.numpy(), labels=np.array(labels),
             image=shown, layer=str(expl.layer), method=expl.method,
             weights_source=str(getattr(adapter, "weights_source", "")), **extra)
    print(f"maps {tuple(maps.shape)} at layer {expl.layer!r} -> {npz}")
    return 0


# --------------------------------------------------------------------------- classify


class Classify:
    HELP = "explain an image classifier's classes on an image (torchvision models)"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _add_common(parser, None, image=True)
        parser.add_argument("--classes", default=None,
                            help="comma-separated class names or indices (default: the top ones)")
        parser.add_argument("--top", type=int, default=1,
                            help="explain the top K predictions when --classes is not given")
        _add_size(parser, "crop size of the preprocessing (default: the weights')")
        parser.add_argument("--num-classes", type=int, default=None)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from mmexplain.tasks.classify import class_indices, explain_image

        image = _read_image(args)
        folder = _folder_family(args, "classify")
        args.model = args.model or "resnet18"
        _refuse_written(args)
        options = {} if folder else dict(size=args.size, num_classes=args.num_classes)
        adapter = _capable(build_adapter(args.model, args.weights, args.layer, args.device,
                                         args.seed, **options), "classify", "classify")
        print(_weights_line(adapter))
        x, shown = adapter.preprocess.image(image)
        x = x.unsqueeze(0).to(device_of(adapter))
        expl, labels = explain_image(adapter, x, _split(args.classes), args.method, top=args.top)
        classes = class_indices(labels[0], adapter.categories)
        return _write_image_results(args, adapter, expl, labels[0], shown,
                                    {"classes": np.array([classes])})


# --------------------------------------------------------------------------- caption / vqa


def _language_adapter(args: argparse.Namespace, task: str) -> Any:
    """The --model for caption/vqa; by default the shipped shapes model, else (not
    registered, or its weights not built) a random-weight stand-in with the shapes
    world's tiny vocabulary, said so."""
    from mmexplain.adapters import list_adapters

    if _folder_family(args, task):
        return build_adapter(args.model, args.weights, args.layer, args.device, args.seed)
    if args.model is None:
        args.model, why = SHIPPED[task], "is not registered"
        if args.model in list_adapters():
            try:
                return build_adapter(args.model, args.weights, args.layer, args.device,
                                     args.seed)
            except MMExplainError as exc:
                why = f"cannot be built ({exc})"
        print(f"note: {SHIPPED[task]!r} {why}")
        args.model = FALLBACK[task]
    options: dict[str, Any] = {}
    if args.model == FALLBACK[task] and args.weights is None:
        from mmexplain.data import shapes

        if task == "caption":
            options["vocab"] = shapes.CAPTION_VOCAB
        else:
            options.update(question_vocab=shapes.QUESTION_VOCAB, answer_vocab=shapes.ANSWER_VOCAB)
        options["trunk"] = "tiny"
        print(f"note: using {args.model!r} with random weights, a tiny CNN and the shapes "
              "world's vocabulary: its maps show the mechanics, not a trained model's evidence")
    return build_adapter(args.model, args.weights, args.layer, args.device, args.seed,
                         **options)


def _language_input(args: argparse.Namespace, task: str, capability: str, prompt: str | None
                    ) -> tuple[Any, Any, np.ndarray, dict[str, Any]]:
    """The caption / vqa model with the capability ``task`` needs (its weights said), and
    the image prepared for it: (adapter, inputs, the picture shown, the context). A video
    file goes to a model that reads video as ``--frames`` frames spread evenly over it
    (the picture shown is then those frames as the model saw them, (T, h, w, 3))."""
    from mmexplain.data.video_folder import VIDEO_EXTENSIONS

    video = Path(args.input).suffix.lower() in VIDEO_EXTENSIONS
    if video and args.frames < 1:
        raise bad_value("--frames", "a positive number of frames", args.frames)
    image = None if video else _read_image(args)
    adapter = _capable(_language_adapter(args, task), capability, task)
    _refuse_written(args)  # args.model is known now
    print(_weights_line(adapter))
    if image is not None:
        return (adapter, *_prepared(adapter, image, prompt, args.size))
    if not callable(getattr(adapter, "prepare_video", None)):
        raise InputError(f"IMAGE: expected a picture for {adapter.name}, which reads no video "
                         f"(models that do: qwen2-vl, qwen2.5-vl), received the video "
                         f"{args.input!r}")
    from mmexplain.data.video import read_uniform_frames

    frames, args.frame_indices = read_uniform_frames(args.input, args.frames)
    print(f"video: frames {', '.join(map(str, args.frame_indices))} of {args.input}")
    return (adapter, *adapter.prepare_video(frames, prompt))


def _add_frames(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=8,
                        help="for a video file and a model that reads video (Qwen2-VL, "
                        "Qwen2.5-VL): frames spread evenly over it (default 8)")


class Caption:
    HELP = "explain a captioner's caption (or some of its words) on an image"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _add_common(parser, None, image=True, size=SIZE_HELP)
        _add_frames(parser)
        parser.add_argument("--caption", default=None,
                            help="caption to explain (default: the model's own caption)")
        parser.add_argument("--words", default="all",
                            help="'all' (default: one map per word), 'visual', 'caption' (one "
                            "map of the whole caption's log-probability) or comma-separated "
                            "words of the caption to explain one by one")
        parser.add_argument("--prompt", default=None,
                            help="text the model reads before its caption (models that take "
                            "one: BLIP 'a picture of', a VQA model's question)")
        parser.add_argument("--max-tokens", type=int, default=20,
                            help="most tokens of the generated caption (default 20)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from mmexplain.tasks.caption import explain_caption

        if args.max_tokens < 1:
            raise bad_value("--max-tokens", "a positive number of tokens", args.max_tokens)
        adapter, x, shown, context = _language_input(args, "caption", "caption", args.prompt)
        words: Any = (None if args.words == "caption" else args.words
                      if args.words in ("all", "visual") else _split(args.words))
        expl, labels = explain_caption(adapter, x, args.caption, words, args.method,
                                       max_len=args.max_tokens, context=context)
        caption = labels[0] if words is None else " ".join(labels)
        print(f"caption: {args.caption or caption}")
        return _write_image_results(args, adapter, expl, labels, shown,
                                    {"caption": str(args.caption or caption)})


class VQA:
    HELP = "explain a VQA model's answers to a question about an image"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _add_common(parser, None, image=True, size=SIZE_HELP)
        _add_frames(parser)
        parser.add_argument("--question", required=True, help="the question")
        parser.add_argument("--answers", default=None,
                            help="comma-separated answers to explain beside the model's own "
                            "(forced answers: 'what if it said yellow?')")
        parser.add_argument("--top", type=int, default=1,
                            help="explain the model's top K answers when --answers is not given")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        import warnings

        from mmexplain.tasks.vqa import check_question_words, explain_vqa

        given = _answers(args.answers)
        adapter, x, shown, _ = _language_input(args, "vqa", "answer", args.question)
        check_question_words(adapter, args.question, "--question")
        own = [a for a, _ in adapter.answer(x, args.question, top=args.top)[0] if str(a).strip()]
        print(f"question: {args.question}")
        print(f"model's answer: {', '.join(map(str, own)) or '(none: an empty text)'}")
        answers = own + [a for a in given if a not in own]
        if not answers:
            raise bad_value("--answers", "answers to explain (the model gave none)", None)
        with warnings.catch_warnings():  # the unknown words were named above, once
            warnings.filterwarnings("ignore", message="question: the model does not know")
            expl, labels = explain_vqa(adapter, x, args.question, answers, args.method)
        return _write_image_results(args, adapter, expl, labels, shown,
                                    {"question": args.question})


def _answers(text: str | None) -> list[str]:
    """--answers 'a,b' -> ['a', 'b']; an empty answer ('red,,blue') is an error naming it."""
    if text is None:
        return []
    answers = [t.strip() for t in text.split(",")]
    empty = [i for i, a in enumerate(answers) if not a]
    if empty:
        raise bad_value("--answers", "comma-separated answers, none of them empty",
                        f"{text!r} (answer {empty[0] + 1} is empty)", raw=True)
    return answers


# --------------------------------------------------------------------------- video


class Video:
    HELP = ("explain a video model's actions over whole videos (sliding windows, tail included): "
            "files, folders or glob patterns")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("input", metavar="VIDEO", nargs="+",
                            help="video files (anything av decodes), folders of videos or glob "
                            "patterns")
        _add_common(parser, "r3d_18")
        parser.set_defaults(model=None)  # --weights DIR alone: the folder's family
        parser.add_argument("--texts", default=None,
                            help="X-CLIP: comma-separated texts to match the video against "
                            "(its targets; --actions picks among them)")
        parser.add_argument("--window", type=int, default=None,
                            help="frames per window (default: the model's clip length, e.g. 16)")
        parser.add_argument("--stride", type=int, default=None,
                            help="frames between window starts (default: the window); a last "
                            "window aligned to the end covers the frames left over")
        parser.add_argument("--max-windows", type=int, default=None,
                            help="explain only the first N windows of each video")
        parser.add_argument("--batch-size", type=int, default=4,
                            help="windows per forward pass")
        parser.add_argument("--actions", default=None,
                            help="comma-separated action names or indices (default: each "
                            "window's top ones)")
        parser.add_argument("--top", type=int, default=1,
                            help="explain each window's top K actions when --actions is not given")
        parser.add_argument("--per-slice", action="store_true",
                            help="channel weights per time slice instead of over T x H x W")
        _add_size(parser, "crop size (default: the model's, 112; C3D is built for it)")
        parser.add_argument("--width", type=float, default=None,
                            help="C3D width multiplier (e.g. 0.25 for a fast random model)")
        parser.add_argument("--num-classes", type=int, default=None)
        parser.add_argument("--labels", default=None,
                            help="text file of class names, one per line (C3D)")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace outputs that exist (default: refuse, naming them)")
        parser.add_argument("--resume", action="store_true",
                            help="skip the videos with a record in OUT/records.rank*.jsonl "
                            "(an interrupted run goes on)")
        parser.add_argument("--sequential", action="store_true",
                            help="decode in the main thread, in turn with the model (default: "
                            "a worker thread decodes the next windows while the model runs)")
        parser.add_argument("--bf16", action="store_true",
                            help="run the model under bfloat16 autocast (on a GPU: about half "
                            "the memory and time; on CPUs without bf16 units 3-D convolutions "
                            "get far slower); the maps are computed in float32")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from mmexplain.data.video_folder import expand_video_inputs, output_stems
        from mmexplain.process import release_large_blocks
        from mmexplain.runs import join_world, leave_world, read_records, run_items

        release_large_blocks()  # a long run's memory stays flat (mmexplain.process)

        for arg, value in (("--batch-size", args.batch_size), ("--top", args.top)):
            if value < 1:
                raise bad_value(arg, "a positive number", value)
        paths = expand_video_inputs(args.input)
        out = _out_dir(args)
        if not _folder_family(args, "video") and args.model is None:
            args.model = "r3d_18"
        suffix = f"_{_slug(args.model)}_{_slug(args.method)}"
        jobs = _video_jobs(args, [(p, out / (s + suffix))
                                  for p, s in zip(paths, output_stems(paths))])
        adapter = build_adapter(args.model, args.weights, args.layer, args.device, args.seed,
                                size=args.size, width=args.width, num_classes=args.num_classes,
                                labels=args.labels, texts=_split(args.texts))
        print(_weights_line(adapter))
        window = args.window or getattr(adapter, "clip_length", None) or 16
        fixed = getattr(adapter, "input_grid", None)
        if fixed is not None and window != fixed[0]:
            why = getattr(adapter, "input_grid_reason", "its fully connected layers fix the "
                          "clip length")
            raise bad_value("--window", f"{fixed[0]} frames for {args.model} ({why})", window)
        items = [{"id": base.name, "path": path, "base": base} for path, base in jobs]
        if args.resume:
            done = len(set(read_records(out)) & {item["id"] for item in items})
            print(f"resume: {done} of {len(items)} videos already done")

        def explain(item: dict[str, Any]) -> dict[str, Any]:
            record = _explain_video(args, adapter, item["path"], item["base"], window)
            print(json.dumps(record))
            return record

        world = join_world()  # torchrun --nproc-per-node N: every N-th video per process
        try:
            summary = run_items(items, explain, _video_summary, out, resume=args.resume,
                                desc="video", progress=world.is_main and len(items) > 1,
                                world=world)
        finally:
            leave_world(world)
        if summary is not None:  # rank 0
            print(f"run: {summary['videos']} videos -> {_video_index(out, items)}")
        return 0


def _video_index(out: Path, items: list[dict[str, Any]]) -> Path:
    """OUT/index.html: per video (in input order) its overlay MP4, its top actions and the
    curve of each frame's share of the explanation (the first target)."""
    from mmexplain.render import Report
    from mmexplain.runs import read_records

    records = read_records(out)
    report = Report(f"mmexplain video: {len(items)} videos")
    for item in items:
        record = records[item["id"]]
        report.section(f"{record['video']} ({record['frames']} frames, "
                       f"{record['windows']} windows)")
        report.text("; ".join(f"{a['action']}: top action of {a['windows']} windows, mean "
                              f"score {a['mean_score']:.4g}" for a in record["actions"]))
        report.video(record["mp4"])
        with np.load(record["npz"]) as saved:
            curve = torch.from_numpy(saved["frame_importance"][:1])
        report.image(_importance_strips(curve, 480, 48)[0],
                     caption="each frame's share of the explanation, first to last frame")
    return report.save(out / "index.html")


def _video_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"videos": len(records), "frames": sum(r["frames"] for r in records),
            "windows": sum(r["windows"] for r in records)}


def _video_jobs(args: argparse.Namespace, jobs: list[tuple[Path, Path]]
                ) -> list[tuple[Path, Path]]:
    """The (video, output base) pairs: an existing output is an error unless --overwrite,
    or --resume (which skips the videos whose records are written, see mmexplain.runs)."""
    if not args.overwrite and not args.resume:
        existing = [str(f) for _, b in jobs for f in (b.with_suffix(".mp4"), b.with_suffix(".npz"))
                    if f.exists()]
        _written(jobs[0][1].parent, existing, "--overwrite / --resume")
    return jobs


def _explain_windows(args: argparse.Namespace, adapter: Any, path: Path, window: int
                     ) -> dict[str, Any]:
    """Every window of the video explained; its decoding streamed (in a worker thread unless
    --sequential). Returns the per-window arrays and the stitched per-frame maps."""
    from mmexplain.data.video import background, stream_windows
    from mmexplain.tasks.classify import class_indices
    from mmexplain.tasks.video import StitchedMaps, explain_clip

    device = device_of(adapter)

    def batches() -> Any:
        chunk: list[Any] = []
        for clip in stream_windows(path, window, args.stride, args.max_windows,
                                   transform=adapter.preprocess.frame):
            chunk.append(clip)
            if len(chunk) == args.batch_size:
                yield _window_batch(adapter, chunk, device)
                chunk = []
        if chunk:
            yield _window_batch(adapter, chunk, device)

    categories = getattr(adapter, "categories", None)
    stitched, found = StitchedMaps(), {"maps": [], "scores": [], "classes": [], "labels": [],
                                       "frame_indices": []}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.bf16))
    for indices, fps, x in (batches() if args.sequential else background(batches())):
        with autocast:
            expl, names = explain_clip(adapter, x.to(device, non_blocking=True),
                                       _split(args.actions), args.method, args.per_slice,
                                       top=args.top)
        m = expl.maps.detach().float().cpu()  # (b, K, T', H', W')
        s = expl.scores.detach().float().cpu()
        for j, idx in enumerate(indices):
            stitched.add(m[j], idx)
            print(f"window {len(found['frame_indices'])}: frames {idx[0]}-{idx[-1]} "
                  f"({idx[0] / fps:.2f}-{idx[-1] / fps:.2f} s): "
                  + ", ".join(f"{n} {v:.4g}" for n, v in zip(names[j], s[j].tolist())))
            found["frame_indices"].append(list(idx))
        found["maps"].append(m)
        found["scores"].append(s)
        found["classes"].extend(class_indices(row, categories) for row in names)
        found["labels"].extend(names)
    found["maps"], found["scores"] = torch.cat(found["maps"]), torch.cat(found["scores"])
    return {**found, "stitched": stitched, "layer": str(expl.layer), "method": expl.method}


def _window_batch(adapter: Any, clips: Sequence[Any], device: torch.device
                  ) -> tuple[list[tuple[int, ...]], float, torch.Tensor]:
    """(frame indices per window, fps, model input (b, 3, T, h, w)) from windows of frames
    already resized and cropped; pinned for a GPU."""
    x = torch.stack([adapter.preprocess.normalize(c.frames).transpose(0, 1) for c in clips])
    if device.type == "cuda":
        x = x.pin_memory()
    return [c.indices for c in clips], clips[0].fps, x


def _explain_video(args: argparse.Namespace, adapter: Any, path: Path, base: Path,
                   window: int) -> dict[str, Any]:
    """One video: windows explained, the stitched overlay MP4 and the .npz written; its record."""
    from mmexplain.data.video import probe_video

    info = probe_video(path)
    length = (f"{info.num_frames} frames at {info.fps:g} fps ({info.duration:.2f} s)"
              if info.num_frames else f"{info.fps:g} fps (its header gives no frame count)")
    print(f"video: {path}: {length}")
    found = _explain_windows(args, adapter, path, window)
    stitched = found["stitched"]
    n_win = len(found["frame_indices"])
    print(f"{n_win} windows of {window} frames, stride {args.stride or window}; "
          f"frames 0-{stitched.num_frames - 1} explained")
    mp4 = base.with_suffix(".mp4")
    frames = _render_video(adapter, path, found, mp4, info.fps, args.cmap)
    print(f"overlay video: {frames} frames at {info.fps:g} fps -> {mp4}")
    npz = base.with_suffix(".npz")
    frame_maps = stitched.maps()
    np.savez(npz, maps=found["maps"].numpy(), scores=found["scores"].numpy(),
             classes=np.array(found["classes"]), labels=np.array(found["labels"]),
             frame_indices=np.array(found["frame_indices"]), frame_maps=frame_maps.numpy(),
             frame_windows=stitched.counts.numpy(), frame_importance=stitched.importance().numpy(),
             fps=info.fps, layer=found["layer"], method=found["method"],
             per_slice=args.per_slice, video=str(path),
             weights_source=str(getattr(adapter, "weights_source", "")))
    print(f"maps {tuple(found['maps'].shape)} at layer {found['layer']!r}, per frame "
          f"{tuple(frame_maps.shape)} -> {npz}")
    top: dict[str, list[float]] = {}
    for names, scores in zip(found["labels"], found["scores"].tolist()):
        top.setdefault(names[0], []).append(scores[0])
    actions = sorted(((n, len(v), sum(v) / len(v)) for n, v in top.items()), key=lambda a: -a[1])
    return {"video": str(path), "frames": stitched.num_frames, "fps": info.fps, "windows": n_win,
            "actions": [{"action": n, "windows": w, "mean_score": round(s, 6)}
                        for n, w, s in actions[:5]],
            "mp4": str(mp4), "npz": str(npz)}


def _importance_strips(curves: torch.Tensor, width: int, height: int) -> np.ndarray:
    """(K, N) per-frame importance -> (K, height, width, 3) uint8 plots (white curve on black,
    each scaled to its own maximum)."""
    k, n = curves.shape
    cols = torch.clamp((torch.arange(width) * n) // width, max=n - 1)  # frame of each column
    top = curves.amax(dim=1, keepdim=True)
    level = torch.where(top > 0, curves / top.clamp(min=1e-30), torch.zeros_like(curves))
    rows = (height - 1 - (level[:, cols] * (height - 1)).round().long())  # (K, width)
    strips = np.zeros((k, height, width, 3), np.uint8)
    ys = torch.arange(height).view(1, height, 1)
    strips[(ys >= rows[:, None, :]).numpy()] = (90, 90, 90)  # area under the curve
    strips[(ys == rows[:, None, :]).numpy()] = (255, 255, 255)
    return strips


def _nearest_windows(frame_indices: Sequence[Sequence[int]], frames: int) -> np.ndarray:
    """(frames,) the window whose centre is nearest each frame among those covering it
    (-1: none covers it; on a tie the earlier window). Window by window over the frames it
    covers: memory O(frames), time O(frames x overlap); a frames x windows table would take
    40 MB per array for a 5-minute video and grow with the square of its length."""
    best = np.full(frames, np.inf)
    nearest = np.full(frames, -1, dtype=np.int64)
    for w, idx in enumerate(frame_indices):
        first, last = int(idx[0]), int(idx[-1])
        n = np.arange(max(first, 0), min(last, frames - 1) + 1)
        distance = np.abs(n - (first + last) / 2)
        closer = distance < best[n]
        best[n[closer]], nearest[n[closer]] = distance[closer], w
    return nearest


def _label_band(text: str, width: int, height: int = 12) -> np.ndarray:
    """(height, width, 3) uint8: ``text`` in white on black, cut to the width."""
    from PIL import Image, ImageDraw, ImageFont

    band = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(band)
    font = ImageFont.load_default()
    while text and draw.textlength(text, font=font) > width - 2:
        text = text[:-1]
    draw.text((1, 0), text, fill=(255, 255, 255), font=font)
    return np.asarray(band)


def _render_video(adapter: Any, path: Path, found: dict[str, Any], mp4: Path, fps: float,
                  cmap: str = "jet") -> int:
    """Decode the video again (streamed) and write each explained frame once: the action
    of the window nearest the frame over the model's view with its stitched map (one panel
    per target, each normalised over the whole video) over a strip plotting each frame's
    share of the explanation, the frame marked."""
    from mmexplain.data.video import VideoWriter, iter_frames
    from mmexplain.render import overlay_clip

    stitched = found["stitched"]
    maps = stitched.maps()  # (K, N, h', w'): normalised in place (a long video's only copy)
    lo = maps.flatten(1).amin(dim=1).view(-1, 1, 1, 1)
    span = maps.flatten(1).amax(dim=1).view(-1, 1, 1, 1) - lo
    maps.sub_(lo).div_(span.clamp(min=1e-30))  # a constant map (span 0) is 0 everywhere
    covered = (stitched.counts > 0).numpy()
    h, w = adapter.preprocess.crop
    strips = _importance_strips(stitched.importance(), w, max(8, h // 8))  # (K, sh, w, 3)
    n = stitched.num_frames
    nearest = _nearest_windows(found["frame_indices"], n)
    bands: dict[str, np.ndarray] = {}

    def label(frame: int, k: int) -> np.ndarray:
        text = str(found["labels"][nearest[frame]][k]) if nearest[frame] >= 0 else ""
        return bands.setdefault(text, _label_band(text, w))

    def panels(chunk: list[np.ndarray], start: int) -> np.ndarray:
        shown = np.stack(chunk)  # (n, h, w, 3) as the model saw them
        end = start + len(chunk)
        out = []
        for k in range(maps.shape[0]):
            over = overlay_clip(shown, maps[k, start:end], normalize=False, cmap=cmap)
            over = np.where(covered[start:end, None, None, None], over, shown)
            strip = np.repeat(strips[k][None], len(chunk), axis=0)
            marks = np.clip((np.arange(start, end) * w) // n, 0, w - 1)
            strip[np.arange(len(chunk)), :, marks] = (255, 60, 60)
            top = np.stack([label(f, k) for f in range(start, end)])
            out.append(np.concatenate([top, over, strip], axis=1))
        return np.concatenate(out, axis=2)  # (n, 12 + h + sh, K*w, 3)

    with VideoWriter(mp4, fps) as writer:
        chunk, start = [], 0
        for frame in iter_frames(path, stop=n, transform=adapter.preprocess.frame):
            chunk.append(frame)
            if len(chunk) == 16:
                writer.write(panels(chunk, start))
                start, chunk = start + len(chunk), []
        if chunk:
            writer.write(panels(chunk, start))
        return writer.frames_written


COMMANDS = {"caption": Caption, "vqa": VQA, "video": Video, "classify": Classify}

__all__ = ["COMMANDS", "build_adapter", "read_image"]
