"""Figures for reports: deletion/insertion curves, grouped bars, the sanity-check panel.

Each plot has two functions: ``*_figure`` builds a :class:`matplotlib.figure.Figure`
(what tests and callers who want to restyle it read), and the plain name returns
its PNG bytes (what :meth:`mmexplain.render.Report.plot` embeds).

Figures are drawn with ``matplotlib.figure.Figure`` on a ``FigureCanvasAgg`` and
never through ``pyplot``: nothing global changes (no backend switch, no figure
registry, no open windows), so a program that uses pyplot itself is not touched.

The PNG is exactly ``size = (width, height)`` pixels (figure inches times ``dpi``;
no tight bounding box). The sanity panel's tiles are the maps coloured as the
overlays colour them (:func:`mmexplain.render.heatmap_image`: per-map
normalisation, the same colormap), so a tile's pixels are the library's heat map.
"""

from __future__ import annotations

import functools
import inspect
import io
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmexplain.errors import bad_type, bad_value
from mmexplain.render import heatmap_image

__all__ = ["bars", "bars_figure", "curves", "curves_figure", "figure_png", "sanity_figure", "sanity_panel"]

_DPI = 100


def _check_size(size: Any) -> tuple[int, int]:
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and 16 <= s <= 8192 for s in size)
    ):
        raise bad_value("size", "a pair of ints (width, height) in pixels, each in [16, 8192]", size)
    return int(size[0]), int(size[1])


def _new_figure(size: tuple[int, int]) -> Figure:
    w, h = _check_size(size)
    fig = Figure(figsize=(w / _DPI, h / _DPI), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure) -> bytes:
    """A figure rendered by Agg as PNG bytes, at the figure's own size and dpi."""
    if not isinstance(fig, Figure):
        raise bad_type("fig", "a matplotlib.figure.Figure", fig)
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    buf = io.BytesIO()
    canvas.print_png(buf)
    return buf.getvalue()


def _png_twin(build: Callable[..., Figure], name: str) -> Callable[..., bytes]:
    """The function ``name`` taking ``build``'s arguments and returning its figure's PNG bytes."""

    @functools.wraps(build)
    def png(*args: Any, **kwargs: Any) -> bytes:
        return figure_png(build(*args, **kwargs))

    png.__name__ = png.__qualname__ = name
    png.__doc__ = f":func:`{build.__name__}` as PNG bytes (the same arguments).\n\n{build.__doc__}"
    png.__signature__ = inspect.signature(build).replace(return_annotation=bytes)  # type: ignore[attr-defined]
    return png


def _check_mapping(arg: str, value: Any, what: str) -> None:
    if not isinstance(value, Mapping):
        raise bad_type(arg, f"a dict of {what}", value)
    if len(value) == 0:
        raise bad_value(arg, f"a non-empty dict of {what}", value)


def _as_series(arg: str, value: Any) -> np.ndarray:
    """A non-empty 1-D finite float64 array (one point is drawn as its marker)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise bad_type(arg, "a 1-D array or list of numbers", value) from None
    if arr.ndim != 1 or arr.size < 1:
        raise bad_value(arg, "a non-empty 1-D array of numbers", value)
    if not np.isfinite(arr).all():
        raise bad_value(arg, "finite numbers", "values containing NaN or inf", raw=True)
    return arr


# ---------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------


def curves_figure(
    series: Mapping[str, np.ndarray | Sequence[float]],
    *,
    x: np.ndarray | Sequence[float] | None = None,
    auc: Mapping[str, float] | None = None,
    title: str = "",
    xlabel: str = "fraction of the input removed",
    ylabel: str = "score",
    hline: float | None = None,
    xticklabels: Sequence[str] | None = None,
    size: tuple[int, int] = (640, 420),
) -> Figure:
    """One line per name in ``series`` (e.g. a method's deletion curve), in the dict's order.

    ``x`` is shared by every curve; by default a curve of ``n`` points is drawn at
    ``linspace(0, 1, n)`` (the fraction of cells removed or inserted). ``auc[name]``,
    when given, goes into the legend as ``"name (AUC 0.290)"``. ``hline`` draws a
    dashed horizontal bar at that height (e.g. the sanity check's 0.5);
    ``xticklabels`` names the points of ``x`` (e.g. the layers randomised).
    """
    _check_mapping("series", series, "name -> 1-D curve")
    if auc is not None and not isinstance(auc, Mapping):
        raise bad_type("auc", "a dict name -> area under the curve", auc)
    xs = None if x is None else _as_series("x", x)
    fig = _new_figure(size)
    ax = fig.add_subplot()
    for name, values in series.items():
        y = _as_series(f"series[{name!r}]", values)
        if xs is not None and xs.size != y.size:
            raise bad_value(f"series[{name!r}]", f"{xs.size} points, as many as x", f"{y.size} points", raw=True)
        label = str(name)
        if auc is not None and auc.get(name) is not None and math.isfinite(float(auc[name])):
            label += f" (AUC {float(auc[name]):.3f})"
        ax.plot(np.linspace(0.0, 1.0, y.size) if xs is None else xs, y, label=label, linewidth=1.6, marker=".")
    if hline is not None:
        ax.axhline(_bar_value("hline", hline), color="grey", linestyle="--", linewidth=1.0)
    if xticklabels is not None:
        if xs is None or isinstance(xticklabels, str) or len(xticklabels) != xs.size:
            raise bad_value("xticklabels", "one label per point of x (x given)", xticklabels)
        ax.set_xticks(xs, [str(t) for t in xticklabels], rotation=45, ha="right", fontsize="small")
    ax.set_title(str(title), wrap=True)
    ax.set_xlabel(str(xlabel))
    ax.set_ylabel(str(ylabel))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig


curves = _png_twin(curves_figure, "curves")


# ---------------------------------------------------------------------------
# Grouped bars
# ---------------------------------------------------------------------------


def _bar_value(arg: str, value: Any) -> float:
    """A bar's height; NaN for a missing value (None or NaN)."""
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_type(arg, "a number (or None / NaN for a missing value)", value)
    if math.isinf(value):
        raise bad_value(arg, "a finite number (or None / NaN for a missing value)", value)
    return float(value)


def bars_figure(
    values: Mapping[str, Mapping[str, float | None]],
    *,
    title: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (640, 420),
) -> Figure:
    """Grouped bars: one group per figure (outer key), one bar per method (inner key).

    Methods keep their first-seen order and colour across groups; the legend names
    them. A missing value (None, NaN, or a method absent from a group) draws no bar
    and writes "n/a" where the bar would stand. Bars are drawn in group order, then
    method order, so ``ax.patches`` lists the present values in that order.
    """
    _check_mapping("values", values, "figure -> {method: value}")
    methods: list[str] = []
    for group, row in values.items():
        _check_mapping(f"values[{group!r}]", row, "method -> value")
        methods += [m for m in row if m not in methods]
    fig = _new_figure(size)
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    colours = [f"C{i % 10}" for i in range(len(methods))]
    for j, method in enumerate(methods):
        heights = [_bar_value(f"values[{g!r}][{method!r}]", row.get(method)) for g, row in values.items()]
        pos = np.arange(len(heights)) + (j - (len(methods) - 1) / 2) * width
        present = [i for i, h in enumerate(heights) if not math.isnan(h)]
        ax.bar(pos[present], [heights[i] for i in present], width, label=str(method), color=colours[j])
        for i in (i for i, h in enumerate(heights) if math.isnan(h)):
            ax.text(pos[i], 0.0, "n/a", ha="center", va="bottom", fontsize="small")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(np.arange(len(values)), [str(g) for g in values])
    ax.set_title(str(title))
    ax.set_ylabel(str(ylabel))
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


bars = _png_twin(bars_figure, "bars")


# ---------------------------------------------------------------------------
# Sanity panel
# ---------------------------------------------------------------------------


def _tile_map(arg: str, value: Any) -> np.ndarray:
    """A map for a tile: (h, w), or a clip's (T, h, w) averaged over time."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    elif isinstance(value, (list, tuple)):
        value = np.asarray(value, dtype=np.float64)
    if not isinstance(value, np.ndarray) or value.ndim not in (2, 3):
        raise bad_value(arg, "an (h, w) map or a (T, h, w) clip map", value)
    return value.mean(axis=0) if value.ndim == 3 else value


def _short_names(layers: Sequence[str], width: int = 18) -> list[str]:
    """Layer names for narrow tiles: their common dotted prefix dropped (each keeping two
    components at least: "classifier.4", not "4"), then at most ``width`` characters,
    leading components dropped first ("…stages.conv4.2")."""
    names = [str(n) for n in layers]
    parts = [n.split(".") for n in names]
    common = 0
    while len(names) > 1 and all(len(p) >= common + 3 and p[common] == parts[0][common] for p in parts):
        common += 1
    out = []
    for p in parts:
        p, cut = p[common:], False
        while len(".".join(p)) > width and len(p) > 1:  # whole components first
            p, cut = p[1:], True
        name = ("…" if cut else "") + ".".join(p)
        out.append(name if len(name) <= width else "…" + name[-(width - 1):])
    return out


def _check_panel(maps: Any, layers: Any, correlations: Any) -> None:
    _check_mapping("maps", maps, "method -> [trained map, map after each step]")
    _check_mapping("correlations", correlations, "method -> [correlation after each step]")
    if isinstance(layers, str) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise bad_value("layers", "a non-empty list of layer names, one per randomisation step", layers)
    for method, row in maps.items():
        if isinstance(row, (str, np.ndarray, torch.Tensor)) or not isinstance(row, Sequence):
            raise bad_type(f"maps[{method!r}]", "a list of maps", row)
        if len(row) != len(layers) + 1:
            raise bad_value(f"maps[{method!r}]", f"{len(layers) + 1} maps (trained, then one per layer)",
                            f"{len(row)} maps", raw=True)
        corr = correlations.get(method)
        if corr is None or isinstance(corr, str) or not isinstance(corr, Sequence) or len(corr) != len(layers):
            raise bad_value(f"correlations[{method!r}]", f"{len(layers)} correlations, one per layer", corr)


def sanity_figure(
    maps: Mapping[str, Sequence[np.ndarray]],
    layers: Sequence[str],
    correlations: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    cmap: str | np.ndarray = "jet",
    size: tuple[int, int] | None = None,
) -> Figure:
    """The cascading-randomisation panel (Adebayo et al., 2018, Fig. 2).

    Rows are methods; columns are the trained model, then the model after each
    step of the cascade (``layers[i]`` is the last layer randomised at step
    ``i``). Each tile is the map coloured by :func:`mmexplain.render.heatmap_image`,
    titled with the step (the layer's name, its common prefix dropped, cut to 18
    characters from the left) and its rank correlation to the trained map
    (``correlations[method][i]``; NaN shows as "n/a"). A clip's map is averaged
    over time. ``size`` defaults to 130 x 150 pixels per tile (at least 400 wide).
    """
    _check_panel(maps, layers, correlations)
    rows, cols = len(maps), len(layers) + 1
    names = _short_names(layers)
    fig = _new_figure(size if size is not None else (max(130 * cols, 400), 150 * rows + 50))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, (method, row) in enumerate(maps.items()):
        for c, m in enumerate(row):
            ax = axes[r][c]
            ax.imshow(heatmap_image(_tile_map(f"maps[{method!r}][{c}]", m), cmap=cmap), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title("trained", fontsize="small")
                ax.set_ylabel(str(method), fontsize="small")
                continue
            rho = _bar_value(f"correlations[{method!r}][{c - 1}]", correlations[method][c - 1])
            shown = "n/a" if math.isnan(rho) else f"{rho:.2f}"
            ax.set_title(f"{names[c - 1]}\nρ = {shown}", fontsize="x-small")
    if title:
        fig.suptitle(str(title), fontsize="medium", wrap=True)
    return fig


sanity_panel = _png_twin(sanity_figure, "sanity_panel")
