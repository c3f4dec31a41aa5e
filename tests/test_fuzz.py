"""Property-based fuzzing (Hypothesis) of the metrics, the engine, the readers and the CLI.

Every example either succeeds with finite results or raises the project's documented
error (:class:`mmexplain.errors.MMExplainError`: InputError, InputTypeError; argparse's
``SystemExit(2)`` on the command line); any other exception, and any NaN (or an inf a
function does not document), fails the property.

CI runs few examples per property, derandomised (the same examples every run);
``scripts/fuzz.py --examples N`` runs the same properties with N random examples each
(``MMX_FUZZ_EXAMPLES`` / ``MMX_FUZZ_RANDOM`` set the two before this module is imported).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from mmexplain import metrics as M
from mmexplain.errors import MMExplainError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EXAMPLES = int(os.environ.get("MMX_FUZZ_EXAMPLES", "10"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=os.environ.get("MMX_FUZZ_RANDOM") != "1",
                suppress_health_check=list(HealthCheck),
                phases=[p for p in Phase if p is not Phase.shrink  # shrinking took minutes
                        or os.environ.get("MMX_FUZZ_SHRINK") == "1"])
COUNTS: Counter[str] = Counter()  # examples run per property, and how many raised our error

torch.set_num_threads(1)


# --------------------------------------------------------------------------- the property


def documented(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, or None when it raised the project's documented error;
    counted under ``name``."""
    COUNTS[name] += 1
    try:
        return fn(*args, **kwargs)
    except MMExplainError:
        COUNTS[name + " (documented error)"] += 1
        return None


def assert_finite(value: Any, what: str, *, inf: bool = False) -> None:
    """No NaN anywhere in ``value`` (tensors, arrays, numbers, containers, dataclasses);
    no inf either unless ``inf`` (a function that documents +inf)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            bad = torch.isnan(value) if inf else ~torch.isfinite(value)
            assert not bad.any(), f"{what}: {int(bad.sum())} non-finite values in {value}"
    elif isinstance(value, np.ndarray):
        if value.dtype.kind in "fc":
            assert_finite(torch.from_numpy(np.ascontiguousarray(value)), what, inf=inf)
    elif isinstance(value, float):
        assert not math.isnan(value) and (inf or math.isfinite(value)), f"{what}: {value}"
    elif isinstance(value, dict):
        for key, v in value.items():
            assert_finite(v, f"{what}[{key!r}]", inf=inf)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            assert_finite(v, f"{what}[{i}]", inf=inf)
    elif hasattr(value, "__dataclass_fields__"):
        for key in value.__dataclass_fields__:
            assert_finite(getattr(value, key), f"{what}.{key}", inf=inf)


def check(name: str, fn: Callable[..., Any], *args: Any, inf: bool = False,
          **kwargs: Any) -> Any:
    """The property: a documented error, or a finite result (returned)."""
    result = documented(name, fn, *args, **kwargs)
    assert_finite(result, name, inf=inf)
    return result


# --------------------------------------------------------------------------- values


DTYPES = [np.float16, np.float32, np.float64, np.int32, np.uint8, np.bool_]


@st.composite
def arrays(draw: Any, min_dims: int = 0, max_dims: int = 4, max_side: int = 6,
           shape: tuple[int, ...] | None = None) -> Any:
    """A tensor (mostly), a numpy array or a nested list of any dtype and shape, with NaN,
    inf, huge and tiny values now and then."""
    dtype = draw(st.sampled_from(DTYPES))
    if shape is None:
        shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0,
                                      max_side=max_side))
    tame = draw(st.booleans())  # half the floats are ordinary numbers in [-10, 10]
    elements = st.floats(-10, 10, width=16) if tame and np.dtype(dtype).kind == "f" else None
    value = draw(hnp.arrays(dtype, shape, elements=elements))
    kind = draw(st.sampled_from(["tensor", "tensor", "tensor", "numpy", "list"]))
    if kind == "tensor":
        return torch.from_numpy(np.array(value))
    return value if kind == "numpy" else value.tolist()


maps_2d = arrays(min_dims=2, max_dims=4)
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 50),
                    st.sampled_from([0, 0.5, 1.0, -1.0]))
boxes = st.one_of(arrays(min_dims=1, max_dims=3, max_side=5),
                  st.lists(st.lists(st.floats(-3, 12), min_size=4, max_size=4), max_size=4)
                  .map(lambda b: torch.tensor(b).reshape(-1, 4)))


# --------------------------------------------------------------------------- metrics


@FUZZ
@given(maps=maps_2d, masks=maps_2d, tolerance=numbers,
       threshold=st.one_of(st.none(), numbers), grid_dims=st.sampled_from([2, 3, 1]))
def test_pointing_game(maps: Any, masks: Any, tolerance: Any, threshold: Any,
                       grid_dims: int) -> None:
    hits = check("pointing_game", M.pointing_game, maps, masks, tolerance, threshold,
                 grid_dims=grid_dims)
    if hits is not None:
        check("pointing_accuracy", M.pointing_accuracy, hits)


@FUZZ
@given(maps=maps_2d, reference=maps_2d, grid_dims=st.sampled_from([2, 3]))
def test_rank_correlation_and_ssim(maps: Any, reference: Any, grid_dims: int) -> None:
    rho = check("rank_correlation", M.rank_correlation, maps, reference, grid_dims=grid_dims)
    if rho is not None:
        assert bool(((rho >= -1 - 1e-9) & (rho <= 1 + 1e-9)).all()), rho
    check("ssim", M.ssim, maps, reference, grid_dims=grid_dims)


@FUZZ
@given(map_=maps_2d, boxes=boxes, other=boxes, size=st.tuples(st.integers(-1, 8),
                                                             st.integers(-1, 8)))
def test_boxes(map_: Any, boxes: Any, other: Any, size: tuple[int, int]) -> None:
    check("box_inside_outside_ratio", M.box_inside_outside_ratio, map_, boxes, inf=True)
    check("boxes_to_mask", M.boxes_to_mask, boxes, *size)
    check("box_iou", M.box_iou, boxes, other)
    check("loc_metric", M.loc_metric, map_, boxes, 0.5)


@FUZZ
@given(map_=maps_2d, threshold=numbers, delta=numbers, mask=maps_2d)
def test_bbox_and_loc_metric(map_: Any, threshold: Any, delta: Any, mask: Any) -> None:
    check("bbox_from_map", M.bbox_from_map, map_, threshold)
    check("loc_metric", M.loc_metric, map_, mask, delta)


@FUZZ
@given(image=arrays(min_dims=3, max_dims=5), map_=maps_2d, grid_dims=st.sampled_from([2, 3]))
def test_explanation_input(image: Any, map_: Any, grid_dims: int) -> None:
    check("explanation_input", M.explanation_input, image, map_, grid_dims=grid_dims)


@FUZZ
@given(y=arrays(max_dims=2), o=arrays(max_dims=2), o_b=arrays(max_dims=2))
def test_confidence_measures(y: Any, o: Any, o_b: Any) -> None:
    check("average_drop", M.average_drop, y, o)
    check("increase_in_confidence", M.increase_in_confidence, y, o)
    check("win_percent", M.win_percent, o, o_b, y)
    check("win_shares", M.win_shares, {"a": o, "b": o_b}, y)
    check("mean_sem", M.mean_sem, y)
    check("summarize_ratios", M.summarize_ratios, o)


@FUZZ
@given(maps=maps_2d, masks=maps_2d, grid_dims=st.sampled_from([2, 3]))
def test_relevance(maps: Any, masks: Any, grid_dims: int) -> None:
    check("relevance_mass_accuracy", M.relevance_mass_accuracy, maps, masks,
          grid_dims=grid_dims)
    check("relevance_rank_accuracy", M.relevance_rank_accuracy, maps, masks,
          grid_dims=grid_dims)


def _score(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *grid) -> (N, 2): two fixed read-outs of the input."""
    flat = x.flatten(1).float()
    return torch.stack([flat.mean(1), flat[:, ::2].sum(1).tanh()], dim=1)


@FUZZ
@given(pixels=arrays(min_dims=3, max_dims=4, max_side=5), maps=arrays(min_dims=2, max_dims=3,
                                                                         max_side=5),
       steps=st.one_of(st.none(), st.integers(-1, 6)), cell=st.one_of(st.integers(-1, 3),
                                                                      st.just((1, 2))),
       mode=st.sampled_from(["deletion", "insertion", "other"]),
       baseline=st.one_of(st.floats(-1, 1), st.just(float("nan"))),
       fractions=st.lists(st.floats(-0.5, 1.5), max_size=3), grid_dims=st.sampled_from([2, 3]))
def test_perturbation_curves(pixels: Any, maps: Any, steps: Any, cell: Any, mode: str,
                             baseline: float, fractions: list[float], grid_dims: int) -> None:
    curve = check("perturbation_curve", M.perturbation_curve, _score, pixels, maps, mode=mode,
                  steps=steps, cell=cell, baseline=baseline, batch_size=4, grid_dims=grid_dims)
    if curve is not None:
        check("curve_auc", M.curve_auc, curve)
    check("road_curve", M.road_curve, _score, pixels, maps, fractions=fractions, batch_size=4,
          grid_dims=grid_dims)


# --------------------------------------------------------------------------- engine


@st.composite
def nets(draw: Any) -> tuple[nn.Module, str, int, tuple[int, ...]]:
    """A small random conv net (2-D or 3-D): convolutions (some with ReLU, some pooled),
    then a flattening or global-pooling head. -> (model, layer, classes, input grid)."""
    dims = draw(st.sampled_from([2, 3]))
    conv, pool = (nn.Conv2d, nn.MaxPool2d) if dims == 2 else (nn.Conv3d, nn.MaxPool3d)
    side = draw(st.integers(1, 6 if dims == 2 else 4))
    channels, layers, names = draw(st.integers(1, 3)), [], []
    grid = side
    for i in range(draw(st.integers(1, 3))):
        out = draw(st.integers(1, 4))
        layers.append(conv(channels, out, kernel_size=draw(st.sampled_from([1, 3])),
                           padding="same"))
        names.append(str(len(layers) - 1))
        if draw(st.booleans()):
            layers.append(nn.ReLU(inplace=draw(st.booleans())))
        if grid >= 2 and draw(st.booleans()):
            layers.append(pool(2))
            grid //= 2
        channels = out
    classes = draw(st.integers(1, 5))
    if draw(st.booleans()):  # global pooling, the CAM architecture
        head = [nn.AdaptiveAvgPool3d(1) if dims == 3 else nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(channels, classes)]
    else:
        head = [nn.Flatten(), nn.Linear(channels * grid**dims, classes)]
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = nn.Sequential(*layers, *head).eval()
    return model, draw(st.sampled_from(names)), classes, (side,) * dims


valid_targets = st.one_of(st.none(), st.integers(0, 1), st.lists(st.integers(0, 1), min_size=1,
                                                                  max_size=3))
targets = st.one_of(valid_targets, valid_targets, valid_targets, st.integers(-2, 6),
                    st.lists(st.integers(-1, 6), max_size=4),
                    st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=2), min_size=1,
                             max_size=3),
                    st.sampled_from([torch.tensor([0, 1]), torch.tensor([[2]]), 1.5, "cat", True]))


@FUZZ
@given(net=nets(), batch=st.sampled_from([1, 1, 2, 3, 0]), target=targets,
       method=st.sampled_from(["gradcam", "gradcam++", "layercam", "hirescam", "xgradcam",
                               "eigencam"]),
       strategy=st.sampled_from(["auto", "expand", "batched", "loop"] * 3 + ["other"]),
       options=st.fixed_dictionaries({}, optional={
           "counterfactual": st.booleans(), "relu": st.booleans(),
           "pooling": st.sampled_from(["mean", "max", "mean", "other"]),
           "gradients": st.sampled_from(["raw", "positive", "raw", "other"])}),
       special=st.sampled_from([None] * 8 + ["nan", "inf", "uint8", "unbatched", "float64",
                                            "huge"]))
def test_engine_on_random_nets(net: Any, batch: int, target: Any, method: str, strategy: str,
                               options: dict[str, Any], special: str | None) -> None:
    from mmexplain.engine import make_cam

    model, layer, _, grid = net
    in_channels = next(model.parameters()).shape[1]
    x = torch.rand(batch, in_channels, *grid)
    if special in ("nan", "inf") and x.numel():
        x.view(-1)[0] = float(special)
    elif special == "uint8":
        x = (x * 255).to(torch.uint8)
    elif special == "unbatched" and batch:
        x = x[0]
    elif special == "float64":
        x = x.double()
    elif special == "huge":
        x = x * 1e30
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cam = documented("make_cam", make_cam, model, method, layer, strategy=strategy, **options)
    if cam is not None:
        check(f"engine {method}", cam, x, target=target)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the model was changed"


# --------------------------------------------------------------------------- readers


def _json(name: str) -> Any:
    path = SHARED_DATA.joinpath(*name.split("/"))
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared test data lives beside the project)")
    return json.loads(path.read_text())


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(),
              st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6)


@st.composite
def mutated(draw: Any, document: Any) -> Any:
    """``document`` (JSON) with a few random changes: a key removed, a value replaced by
    another of any type, a list emptied or cut, an entry duplicated."""
    doc = copy.deepcopy(document)
    for _ in range(draw(st.integers(0, 4))):
        node, parent, key = doc, None, None
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            parent, key = node, draw(st.sampled_from(keys))
            node = node[key]
        if parent is None:
            continue
        action = draw(st.sampled_from(["remove", "replace", "empty", "cut", "duplicate"]))
        if action == "remove" and isinstance(parent, dict):
            del parent[key]
        elif action == "replace" or (action == "remove" and isinstance(parent, list)):
            parent[key] = draw(json_values)
        elif action == "empty" and isinstance(node, (list, dict)):
            parent[key] = type(node)()
        elif action == "cut" and isinstance(node, list):
            parent[key] = node[: draw(st.integers(0, len(node)))]
        elif action == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(node))
    return doc


def _small_coco(kind: str) -> Any:
    """The shared COCO file with one image's annotations (the fuzzing stays fast)."""
    data = _json(f"coco/{kind}.json")
    keep = data["images"][1]["id"]
    return {**data, "images": [data["images"][1]],
            "annotations": [a for a in data["annotations"] if a["image_id"] == keep][:3],
            **({"categories": data["categories"][:3] + [c for c in data["categories"]
                                                         if c["id"] in {1, 22}]}
               if "categories" in data else {})}


def _write(folder: str, name: str, data: Any) -> Path:
    path = Path(folder) / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@FUZZ
@given(data=st.data())
def test_coco_reader(data: Any) -> None:
    from mmexplain.data.coco import CocoAnnotations

    instances = data.draw(mutated(_small_coco("instances")))
    captions = data.draw(mutated(_small_coco("captions")))
    swap = data.draw(st.booleans())
    with tempfile.TemporaryDirectory() as folder:
        paths = (_write(folder, "i.json", instances), _write(folder, "c.json", captions))
        coco = documented("CocoAnnotations", CocoAnnotations, *(paths[::-1] if swap else paths),
                          image_dir=folder)
        if coco is None:
            return
        for image_id in coco.image_ids():
            check("coco captions", coco.captions, image_id)
            check("coco category_masks", coco.category_masks, image_id)
            check("coco annotations", coco.annotations, image_id, include_crowd=False)
            check("coco image_path", coco.image_path, image_id)


@FUZZ
@given(segmentation=json_values | st.lists(st.lists(st.floats(-5, 20), max_size=8), max_size=2)
       | st.fixed_dictionaries({"size": st.lists(st.integers(-1, 6), max_size=3),
                                "counts": st.lists(st.integers(-2, 40), max_size=6)
                                | st.text(max_size=8)}),
       height=st.integers(1, 6), width=st.integers(1, 6))
def test_coco_segmentations(segmentation: Any, height: int, width: int) -> None:
    from mmexplain.data.coco import decode_segmentation, segmentation_area

    mask = check("decode_segmentation", decode_segmentation, segmentation, height, width)
    if mask is not None:
        assert mask.shape == (height, width)
        assert check("segmentation_area", segmentation_area, segmentation, height,
                     width) == int(mask.sum())


@FUZZ
@given(data=st.data())
def test_vqa_reader(data: Any) -> None:
    from mmexplain.data.vqa import load_vqa, normalize_answer, vqa_accuracy

    q, a = _json("vqa/questions_first100.json"), _json("vqa/annotations_first100.json")
    questions = data.draw(mutated({**q, "questions": q["questions"][:3]}))
    annotations = data.draw(mutated({**a, "annotations": a["annotations"][:3]}))
    with tempfile.TemporaryDirectory() as folder:
        items = documented("load_vqa", load_vqa, _write(folder, "q.json", questions),
                           _write(folder, "a.json", annotations))
    for item in items or []:
        check("vqa_accuracy", vqa_accuracy, item.multiple_choice_answer, item.answers)
    check("normalize_answer", normalize_answer, data.draw(json_values))


@FUZZ
@given(data=st.data(), top=st.integers(-1, 4),
       size=st.one_of(st.tuples(st.integers(-1, 900), st.integers(-1, 900)), json_values))
def test_densecap_reader(data: Any, top: int, size: Any) -> None:
    from mmexplain.data.densecap import load_densecap

    dense = _json("densecap/results.json")
    first = dense["results"][0]
    small = {**dense, "results": [{k: v[:4] if isinstance(v, list) else v
                                   for k, v in first.items()}]}
    with tempfile.TemporaryDirectory() as folder:
        results = documented("load_densecap", load_densecap,
                             _write(folder, "r.json", data.draw(mutated(small))))
    for image in results or []:
        region = check("densecap top", image.top, top)
        if region is not None:
            check("densecap boxes", region.boxes, size)


@FUZZ
@given(files=st.lists(st.tuples(st.from_regex(r"\A(\d{1,3}_\d|x|\d+)\.(png|PNG|jpg)\Z"),
                                st.sampled_from(["L", "I;16", "RGB", "F", "1", "P", "bad"]),
                                st.integers(1, 5), st.integers(1, 5)), max_size=4))
def test_vqahat_reader(files: list[tuple[str, str, int, int]]) -> None:
    from PIL import Image

    from mmexplain.data.vqahat import VqaHatMaps

    with tempfile.TemporaryDirectory() as folder:
        for name, mode, h, w in files:
            path = Path(folder) / name
            if mode == "bad":
                path.write_bytes(b"not a png")
            else:
                Image.new(mode, (w, h)).save(path, format="PNG" if mode != "F" else "TIFF")
        hat = documented("VqaHatMaps", VqaHatMaps, folder)
        for qid in hat.question_ids() if hat is not None else []:
            check("vqahat maps", hat.maps, qid)


# --------------------------------------------------------------------------- command line


def _cli_words() -> list[str]:
    """Option names of every command and protocol, and values of every kind."""
    from mmexplain.cli import build_parser

    words: set[str] = set()
    stack = [build_parser()]
    while stack:
        parser = stack.pop()
        for action in parser._actions:
            words.update(action.option_strings)
            choices = getattr(action, "choices", None)
            for name, sub in (choices.items() if isinstance(choices, dict) else ()):
                if hasattr(sub, "_actions"):
                    words.add(name)
                    stack.append(sub)
    words -= {"demo", "serve", "-h", "--help"}  # demo runs everything, serve never returns
    return sorted(words)


CLI_VALUES = ["0", "1", "-1", "2", "64", "1e9", "nan", "", " ", "random", "cpu", "cuda", "meta",
              "gradcam++", "all", "a,b", ",", "shapes", "coco", "folder", "../../x", "é",
              "--", "what ?", "layer4", "conv3", "nope.txt", "/"]


@FUZZ
@given(data=st.data())
def test_command_line(data: Any) -> None:
    import mmexplain.runs as runs
    from mmexplain.cli import main

    from mmexplain.evaluate import PROTOCOLS

    words, values = _cli_words(), CLI_VALUES + ["IMAGE", "TEXT"]
    head = data.draw(st.sampled_from([["classify"], ["caption"], ["vqa"], ["video"], ["eval"],
                                      []]))
    if head == ["eval"]:
        head.append(data.draw(st.sampled_from(sorted(PROTOCOLS) + ["nope"])))
    elif head:
        head.append(data.draw(st.sampled_from(["IMAGE", "IMAGE", "TEXT", "missing.png"])))
    pairs = data.draw(st.lists(st.tuples(st.sampled_from(words), st.sampled_from(values)),
                               max_size=4))
    argv = head + [w for pair in pairs for w in pair][: data.draw(st.integers(0, 8))]
    with tempfile.TemporaryDirectory() as folder:
        image, text = Path(folder) / "tiny.png", Path(folder) / "notes.txt"
        from PIL import Image

        Image.new("RGB", (12, 9), (200, 30, 30)).save(image)
        text.write_text("notes")
        argv = [str(image) if a == "IMAGE" else str(text) if a == "TEXT" else a for a in argv]
        argv += ["--out", str(Path(folder) / "out")] if data.draw(st.booleans()) else []
        real = runs.run_items

        def one_item(items: list, *args: Any, **kwargs: Any) -> Any:  # eval: 1 item at most
            return real(items[:1], *args, **kwargs)

        here = os.getcwd()
        COUNTS["cli"] += 1
        try:
            os.chdir(folder)
            runs.run_items = one_item
            with contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                code = main(argv)
        except SystemExit as exc:  # argparse: 2 for a bad command line
            code = exc.code
        finally:
            runs.run_items = real
            os.chdir(here)
    assert code in (0, 2, 130), (argv, code)
    COUNTS[f"cli exit {code}"] += 1


# --------------------------------------------------------------------------- what the fuzzing found


def test_found_metric_inputs_are_named() -> None:
    """boxes_to_mask with a negative width (RuntimeError from torch.arange), mean_sem of
    huge finite values (an inf standard error), a mask with an empty grid (ZeroDivisionError
    in resize_grid)."""
    from mmexplain.errors import InputError

    box = torch.tensor([[0.0, -2.0, 1.1, 7.6]])
    with pytest.raises(InputError, match=r"^width: expected a positive image width in pixels, "
                       r"received int -1$"):
        M.boxes_to_mask(box, 4, -1)
    summary = M.mean_sem([-8.0581e15, 1.0, -3.4832e-116, 2.4650e178])
    assert summary.mean == pytest.approx(2.4650e178 / 4) and summary.sem == \
        pytest.approx(2.4650e178 / 4, rel=1e-6)  # std of (x, ~0, ~0, ~0) is x / 2, over 2
    assert M.mean_sem([1.79e308]).mean == 1.79e308
    assert M.mean_sem([1.7e308, -1.7e308]) == (0.0, 1.7e308, 2)
    with pytest.raises(InputError, match=r"^size: expected a grid of positive sides"):
        M.relevance_mass_accuracy(torch.zeros(2, 5, dtype=torch.float64),
                                  torch.zeros(0, 0, dtype=torch.float16))


def test_found_coco_segmentations_are_named() -> None:
    """A polygon of four numbers reached pycocotools' box branch (TypeError); an RLE whose
    runs exceed the image made its decoder write past its buffer."""
    from mmexplain.data.coco import decode_segmentation
    from mmexplain.errors import InputError

    with pytest.raises(InputError, match=r"^segmentation: expected polygons: .*three or more"):
        decode_segmentation([[5.0, 0.0, 1.0, 19.2], [0.1, 4.0, 2.0, 13.6, 12.6, 8.5]], 6, 6)
    with pytest.raises(InputError, match=r"^segmentation: expected an RLE dict with size "
                       r"\[2, 3\] and counts covering it"):
        decode_segmentation({"size": [2, 3], "counts": "0Y0"}, 2, 3)  # runs of 0, 41, 0
    mask = decode_segmentation({"size": [2, 3], "counts": [1, 4, 1]}, 2, 3)
    assert mask.T.flatten().tolist() == [False, True, True, True, True, False]  # column-major


def test_found_reader_files_are_named(tmp_path: Path) -> None:
    """load_vqa on questions that are not dicts (TypeError), load_densecap with an 'opt'
    list (AttributeError), a VQA-HAT map PIL cannot read (UnidentifiedImageError) and a map
    named with non-ASCII digits (taken as a question id)."""
    from mmexplain.data.densecap import load_densecap
    from mmexplain.data.vqa import load_vqa
    from mmexplain.data.vqahat import VqaHatMaps
    from mmexplain.errors import InputError

    questions = tmp_path / "q.json"
    questions.write_text(json.dumps({"questions": [[1, 2]]}))
    with pytest.raises(InputError, match=r"^questions: expected questions\[0\] of '.*q\.json' "
                       r"to be a dict with 'question_id', 'image_id', 'question', received "
                       r"list \[1, 2\]$"):
        load_vqa(questions)
    questions.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": "7",
                                                    "question": "why ?"}]}))
    with pytest.raises(InputError, match=r"^questions: expected every entry of 'questions' in "
                       r"a VQA file to have 'image_id' \(an int\), received '.*q\.json', whose "
                       r"questions\[0\] has str '7'$"):
        load_vqa(questions)
    dense = tmp_path / "d.json"
    dense.write_text(json.dumps({"opt": [None], "results": []}))
    with pytest.raises(InputError, match=r"^path: expected a DenseCap results.json with 'opt' "
                       r"\(a dict\) and 'results' \(a list\), received .*d\.json$"):
        load_densecap(dense)
    (tmp_path / "hat").mkdir()
    (tmp_path / "hat" / "12_1.png").write_bytes(b"not a png")
    (tmp_path / "hat" / "\U0001d7ed_1.png").write_bytes(b"")  # MATHEMATICAL DIGIT ONE
    hat = VqaHatMaps(tmp_path / "hat")
    assert hat.question_ids() == [12]
    with pytest.raises(InputError, match=r"^path: expected a VQA-HAT attention map PIL can "
                       r"read \(a greyscale PNG\), received '.*12_1\.png' \(cannot identify"):
        hat.maps(12)


def test_found_a_float64_input_to_a_float32_model_is_named() -> None:
    """Was ``RuntimeError: expected scalar type Double but found Float`` in the convolution."""
    import mmexplain as mx
    from mmexplain.errors import InputError

    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 16, 2))
    with pytest.raises(InputError, match=r"^inputs: expected a tensor of the model's dtype "
                       r"torch.float32 \(x.to\(torch.float32\)\), received tensor of shape "
                       r"\(1, 3, 4, 4\) and dtype torch.float64$"):
        mx.GradCAM(model, layer="0")(torch.rand(1, 3, 4, 4, dtype=torch.float64), target=0)


def test_found_an_empty_batch_of_masks_is_named() -> None:
    """pointing_game on masks (0, 1, 1, 1): a RuntimeError reshaping 0 elements."""
    from mmexplain.errors import InputError

    with pytest.raises(InputError, match=r"^masks: expected leading axes that broadcast with "
                       r"\(\) to at least one map, received tensor of shape \(0, 1, 1, 1\)"):
        M.pointing_game(torch.tensor([[0.0]]), torch.zeros(0, 1, 1, 1))


def test_found_ssim_of_tiny_or_huge_maps_and_explanation_input_of_a_huge_map() -> None:
    """ssim of maps of 1e-167 gave NaN (squares underflowed: 0 / 0); a float64 map of 1e61
    cast to a float32 image's dtype became -inf and E = L o I NaN."""
    torch.manual_seed(0)
    a, b = torch.rand(2, 6, 5, dtype=torch.float64), torch.rand(2, 6, 5, dtype=torch.float64)
    want = M.ssim(a, b)
    for scale in (1e-167, 1e200):
        assert torch.allclose(M.ssim(a * scale, b * scale), want, rtol=1e-12, atol=0)
    flat = torch.full((1, 6, 5), -2.7769e-167, dtype=torch.float64)
    assert M.ssim(flat, flat).tolist() == [1.0]
    image = torch.ones(1, 3, 2, 6)  # float32
    huge = torch.full((1, 6, 1), -2.4102e61, dtype=torch.float64)
    huge[0, 0, 0] = 0.0  # one cell at the top: its column normalised to 1, the rest 0
    got = M.explanation_input(image, huge.transpose(1, 2).expand(1, 2, 6).contiguous())
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert got[0, :, :, 0].eq(1).all() and got[0, :, :, 1:].eq(0).all()


def test_found_a_negative_confidence_is_named() -> None:
    """average_drop(4e-308, -75356) was inf: a drop above 100 % from a score below 0."""
    from mmexplain.errors import InputError

    with pytest.raises(InputError, match=r"^O: expected non-negative confidences "
                       r"\(probabilities, not logits\), received tensor of shape \(\) and dtype "
                       r"torch.int32$"):
        M.average_drop(np.array(4.05398156e-308), torch.tensor(-75356, dtype=torch.int32))
    assert M.average_drop([0.8, 0.5], [0.4, 0.0]) == pytest.approx(75.0)  # (50 + 100) / 2


def test_found_a_huge_tolerance_is_everywhere() -> None:
    """pointing_game with tolerance 1e200: OverflowError (floor of its square, inf)."""
    maps = torch.zeros(2, 6, 5)
    maps[0, 1, 1] = maps[1, 5, 4] = 1.0
    masks = torch.zeros(2, 6, 5)
    masks[:, 0, 0] = 1
    assert M.pointing_game(maps, masks, tolerance=1e200).tolist() == [True, True]
    assert M.pointing_game(maps, masks, tolerance=2).tolist() == [True, False]  # sqrt 2, sqrt 41


def test_found_boxes_of_other_leading_axes_are_named() -> None:
    """box_inside_outside_ratio of maps (3, 2, 4, 2) and boxes (0, 2, 4): an einsum error."""
    from mmexplain.errors import InputError

    with pytest.raises(InputError, match=r"^boxes: expected boxes \(\*lead, N, 4\) whose "
                       r"leading axes broadcast with \(3, 2\), received tensor of "
                       r"shape \(0, 2, 4\)"):
        M.box_inside_outside_ratio(torch.zeros(3, 2, 4, 2), torch.zeros(0, 2, 4))
    with pytest.raises(InputError, match=r"^boxes_b: expected boxes \(\*lead, N, 4\) whose "
                       r"leading axes broadcast with \(4,\), received tensor of shape "
                       r"\(3, 0, 4\)"):  # box_iou: a RuntimeError of torch.minimum
        M.box_iou(torch.zeros(4, 0, 4), torch.zeros(3, 0, 4))
    maps = torch.zeros(3, 2, 4, 2)
    maps[..., 0, 0] = 1.0  # all inside the box (0, 0, 1, 1) of every map: +inf, as documented
    assert M.box_inside_outside_ratio(maps, torch.tensor([[0.0, 0.0, 1.0, 1.0]])).eq(
        math.inf).all()


def test_found_a_nan_baseline_is_named() -> None:
    """perturbation_curve with baseline=nan: every point after the first was NaN."""
    from mmexplain.errors import InputError

    pixels, maps = torch.zeros(2, 1, 5, dtype=torch.float64), torch.zeros(2, 1, 5)
    with pytest.raises(InputError, match=r"^baseline: expected a finite number or a tensor of "
                       r"finite values, received float nan$"):
        M.perturbation_curve(_score, pixels, maps, baseline=float("nan"))
    mean = lambda x: x.flatten(1).mean(1, keepdim=True)  # noqa: E731 (N, 1)
    curve = M.perturbation_curve(mean, torch.ones(2, 1, 4), torch.arange(4.0).view(1, 1, 4),
                                 baseline=0.0)  # one pixel removed per step
    assert curve.flatten().tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
