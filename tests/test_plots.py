"""mmexplain.plots: the figures hold the data they were given, and their PNGs decode at the size asked."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmexplain import plots
from mmexplain.errors import InputError, InputTypeError
from mmexplain.render import Report, heatmap_image


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def texts(fig) -> list[str]:
    """Every text the figure draws: titles, labels, tick labels, legend entries, annotations."""
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


# -- curves -----------------------------------------------------------------


def test_curves_draw_each_series_at_its_fraction_with_the_auc_in_the_legend() -> None:
    gc, gcpp = np.array([0.9, 0.4, 0.1, 0.0]), [0.8, 0.7, 0.3, 0.2, 0.1]
    fig = plots.curves_figure({"Grad-CAM": gc, "Grad-CAM++": gcpp}, auc={"Grad-CAM": 0.29},
                              title="deletion", ylabel="p(class)")
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["Grad-CAM (AUC 0.290)", "Grad-CAM++"]
    np.testing.assert_array_equal(lines[0].get_ydata(), gc)
    np.testing.assert_array_equal(lines[0].get_xdata(), [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_array_equal(lines[1].get_ydata(), gcpp)
    np.testing.assert_array_equal(lines[1].get_xdata(), [0, 0.25, 0.5, 0.75, 1])
    assert {"deletion", "p(class)", "Grad-CAM (AUC 0.290)", "Grad-CAM++"} <= set(texts(fig))


def test_curves_take_a_shared_x_a_tensor_and_a_dashed_bar() -> None:
    fig = plots.curves_figure({"m": torch.tensor([1.0, 0.2, -0.1])}, x=[0, 1, 2], hline=0.5)
    line, bar = fig.axes[0].get_lines()
    np.testing.assert_allclose(line.get_ydata(), [1.0, 0.2, -0.1], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(line.get_xdata(), [0, 1, 2])
    assert list(bar.get_ydata()) == [0.5, 0.5] and bar.get_linestyle() == "--"


def test_a_curve_of_one_point_is_its_marker() -> None:  # a sanity run of one layer
    (line,) = plots.curves_figure({"a": [0.3]}, x=[1], xticklabels=["fc8"]).axes[0].get_lines()
    assert list(line.get_xdata()) == [1] and list(line.get_ydata()) == [0.3]
    assert line.get_marker() == "."


def test_curves_png_decodes_at_the_requested_size() -> None:
    import inspect

    for png_of, figure_of in ((plots.curves, plots.curves_figure), (plots.bars, plots.bars_figure),
                              (plots.sanity_panel, plots.sanity_figure)):  # the same arguments
        assert inspect.signature(png_of).parameters == inspect.signature(figure_of).parameters
        assert inspect.signature(png_of).return_annotation is bytes
    png = plots.curves({"a": [1.0, 0.0]}, title="t", size=(500, 300))
    image = decode(png)
    assert image.format == "PNG" and image.size == (500, 300)
    # not blank: the line and the axes put colour on the white page
    assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"series": {}}, "series: expected a non-empty dict"),
        ({"series": {"a": []}}, "series['a']: expected a non-empty 1-D array of numbers"),
        ({"series": {"a": [[1.0, 2.0]]}}, "series['a']: expected a non-empty 1-D array of numbers"),
        ({"series": {"a": [1.0, float("nan")]}}, "series['a']: expected finite numbers"),
        ({"series": {"a": [1.0, 2.0]}, "x": [0, 1, 2]}, "series['a']: expected 3 points, as many as x, received 2"),
        ({"series": {"a": [1.0, 2.0]}, "size": (10, 300)}, "size: expected a pair of ints (width, height)"),
    ],
)
def test_curves_name_the_bad_argument(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError) as info:
        plots.curves(**kwargs)
    assert message in str(info.value)


# -- bars -------------------------------------------------------------------


def test_bars_heights_are_the_values_and_a_missing_one_is_marked_not_drawn() -> None:
    values = {
        "Average Drop %": {"Grad-CAM": 46.5, "Grad-CAM++": 36.8, "Eigen-CAM": float("nan")},
        "Win %": {"Grad-CAM": 38.0, "Grad-CAM++": 62.0, "Eigen-CAM": None},
        "Increase %": {"Grad-CAM": 13.4, "Eigen-CAM": 9.0},  # Grad-CAM++ absent here
    }
    fig = plots.bars_figure(values, title="faithfulness", ylabel="%")
    ax = fig.axes[0]
    # patches: method by method, each over its present groups
    assert [p.get_height() for p in ax.patches] == [46.5, 38.0, 13.4, 36.8, 62.0, 9.0]
    # each method keeps one colour, the three methods three colours
    colours = [p.get_facecolor() for p in ax.patches]
    assert colours[0] == colours[1] == colours[2] and colours[3] == colours[4] and len(set(colours)) == 3
    # bars of one group sit side by side around the group's tick
    centres = [p.get_x() + p.get_width() / 2 for p in ax.patches]
    np.testing.assert_allclose(centres, [-0.8 / 3, 1 - 0.8 / 3, 2 - 0.8 / 3, 0, 1, 2 + 0.8 / 3], atol=1e-12)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Grad-CAM", "Grad-CAM++", "Eigen-CAM"]
    assert [t.get_text() for t in ax.texts] == ["n/a", "n/a", "n/a"]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(values)
    assert {"faithfulness", "%"} <= set(texts(fig))


def test_bars_png_with_nan_renders_at_the_requested_size() -> None:
    png = plots.bars({"AUC": {"a": float("nan"), "b": 0.3}}, title="x", size=(400, 260))
    assert decode(png).size == (400, 260)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"AUC": {}}, "values['AUC']: expected a non-empty dict of method -> value"),
        ({"AUC": {"a": "high"}}, "values['AUC']['a']: expected a number (or None / NaN"),
        ({"AUC": {"a": float("inf")}}, "values['AUC']['a']: expected a finite number"),
        ([1, 2], "values: expected a dict of figure -> {method: value}"),
    ],
)
def test_bars_name_the_bad_value(values, message: str) -> None:
    with pytest.raises((InputError, InputTypeError)) as info:
        plots.bars(values)
    assert message in str(info.value)


# -- sanity panel -----------------------------------------------------------


def sanity_inputs():
    g = torch.Generator().manual_seed(0)
    maps = {
        "Grad-CAM": [torch.rand(5, 6, generator=g).numpy() for _ in range(3)],
        "Guided Backprop": [torch.rand(2, 5, 6, generator=g) for _ in range(3)],  # a clip's (T, h, w)
    }
    correlations = {"Grad-CAM": [-0.16, 0.02], "Guided Backprop": [0.76, float("nan")]}
    return maps, ["head", "encoder.4"], correlations


def test_sanity_tiles_are_the_library_heat_maps_titled_with_their_correlation() -> None:
    maps, layers, correlations = sanity_inputs()
    fig = plots.sanity_figure(maps, layers, correlations, title="cascading randomisation")
    assert len(fig.axes) == 6  # 2 methods x (trained + 2 steps)
    tiles = [ax.get_images()[0].get_array() for ax in fig.axes]
    np.testing.assert_array_equal(tiles[1], heatmap_image(maps["Grad-CAM"][1]))
    clip_mean = maps["Guided Backprop"][2].double().mean(0).numpy()
    np.testing.assert_array_equal(tiles[5], heatmap_image(clip_mean))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["trained", "head\nρ = -0.16", "encoder.4\nρ = 0.02",
                      "trained", "head\nρ = 0.76", "encoder.4\nρ = n/a"]
    assert [fig.axes[0].get_ylabel(), fig.axes[3].get_ylabel()] == ["Grad-CAM", "Guided Backprop"]
    assert "cascading randomisation" in texts(fig)


def test_sanity_tiles_name_layers_without_their_common_prefix_and_within_18_characters() -> None:
    layers = ["model.classifier.4", "model.trunk.stages.conv4.2", "model.classifier.1"]
    assert plots._short_names(layers) == ["classifier.4", "…stages.conv4.2", "classifier.1"]
    assert plots._short_names(["model.fc8", "model.conv3b.0"]) == ["model.fc8", "model.conv3b.0"]
    assert plots._short_names(["model.fc8"]) == ["model.fc8"]  # one name: nothing in common
    assert plots._short_names(["a." + "b" * 30, "c"]) == ["…" + "b" * 17, "c"]
    maps = {"Grad-CAM": [np.eye(3)] * 4}
    fig = plots.sanity_figure(maps, layers, {"Grad-CAM": [0.1, 0.2, 0.3]})
    assert [ax.get_title() for ax in fig.axes] == [
        "trained", "classifier.4\nρ = 0.10", "…stages.conv4.2\nρ = 0.20", "classifier.1\nρ = 0.30"]


def test_sanity_panel_png_decodes_at_its_size() -> None:
    maps, layers, correlations = sanity_inputs()
    assert decode(plots.sanity_panel(maps, layers, correlations, size=(420, 330))).size == (420, 330)
    # default: 130 px per column (3; at least 400), 150 per row (2) + 50 for the title
    assert decode(plots.sanity_panel(maps, layers, correlations)).size == (400, 350)


def test_sanity_panel_names_a_missing_step() -> None:
    maps, layers, correlations = sanity_inputs()
    maps["Grad-CAM"] = maps["Grad-CAM"][:2]
    with pytest.raises(InputError) as info:
        plots.sanity_panel(maps, layers, correlations)
    assert "maps['Grad-CAM']: expected 3 maps (trained, then one per layer), received 2 maps" in str(info.value)
    maps, layers, correlations = sanity_inputs()
    correlations["Guided Backprop"] = [0.1]
    with pytest.raises(InputError, match=re.escape("correlations['Guided Backprop']: expected 2 correlations")):
        plots.sanity_panel(maps, layers, correlations)


# -- the report and the global state ----------------------------------------


def test_report_plot_embeds_the_png_bytes_as_an_image() -> None:
    png = plots.curves({"a": [1.0, 0.5, 0.0]}, title="deletion")
    page = Report("r").plot(png, "Deletion curves <per method>").to_html()
    uri = re.search(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]*)">', page)
    assert base64.b64decode(uri.group(1)) == png
    assert uri.group(2) == "Deletion curves &lt;per method&gt;"
    assert "<figcaption>Deletion curves &lt;per method&gt;</figcaption>" in page
    with pytest.raises(InputTypeError, match="png: expected PNG bytes"):
        Report("r").plot("curves.png", "x")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="image: expected PNG bytes"):
        Report("r").plot(b"GIF89a", "x")


def test_plots_never_import_pyplot() -> None:
    """No pyplot, so no backend switch, no figure registry, nothing global for a caller's pyplot."""
    code = (
        "import sys\n"
        "from mmexplain import plots\n"
        "plots.curves({'a': [1.0, 0.0]}); plots.bars({'x': {'a': 1.0}})\n"
        "plots.sanity_panel({'m': [[[0.0, 1.0]]] * 2}, ['fc'], {'m': [0.3]})\n"
        "print('matplotlib.pyplot' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]

