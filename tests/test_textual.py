"""Textual explanations: the right units, the right names, the IoU threshold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mmexplain as mx
from mmexplain.errors import InputError, InputTypeError
from mmexplain.textual import NeuronNames, neuron_names, top_neurons

from conftest import GapNet

# channel:        0     1     2     3    4     5     6     7
WEIGHTS = torch.tensor([0.10, -0.30, 0.50, 0.0, -0.10, 0.20, -0.05, 0.20])
# (unit, category, label, score) in tally.csv's column order, 0-based units here
NAMES = [(0, "object", "book", 0.12), (1, "scene", "sky", 0.10), (2, "object", "shelf", 0.08),
         (4, "object", "car", 0.049), (5, "part", "door", 0.05), (6, "object", "road", 0.2)]


def test_top_and_bottom_units_with_names_above_the_threshold() -> None:
    text = top_neurons(WEIGHTS, NAMES, k=3)
    s = text[0, 0]
    # ties (channels 5 and 7 at 0.20) keep channel order; channel 3 (alpha 0) is in neither list
    assert [n.channel for n in s.positive] == [2, 5, 7]
    assert [n.channel for n in s.negative] == [1, 4, 6]
    assert [n.label for n in s.positive] == ["shelf", "door", None]
    # IoU 0.05 passes the default threshold, 0.049 does not: "car" is dropped
    assert [(n.label, n.named) for n in s.negative] == [("sky", True), ("car", False),
                                                       ("road", True)]
    assert s.positive[0].weight == pytest.approx(0.5)
    assert text.sentence() == (
        "Positively important: shelf (unit 2, IoU 0.08), door (unit 5, IoU 0.05); "
        "negatively important: sky (unit 1, IoU 0.10), road (unit 6, IoU 0.20)")
    stricter = top_neurons(WEIGHTS, NAMES, k=3, iou_threshold=0.1)
    assert stricter.sentence() == (
        "Positively important: no unit named with IoU >= 0.1; "
        "negatively important: sky (unit 1, IoU 0.10), road (unit 6, IoU 0.20)")


def test_named_only_picks_the_top_named_units_and_no_names_lists_units() -> None:
    named = top_neurons(WEIGHTS, NAMES, k=2, named_only=True)[0, 0]
    assert [n.label for n in named.positive] == ["shelf", "door"]
    assert [n.label for n in named.negative] == ["sky", "road"]  # car (IoU 0.049) skipped
    bare = top_neurons(WEIGHTS, k=2)
    assert bare.sentence() == ("Positively important: unit 2 (alpha 0.5), unit 5 (alpha 0.2); "
                               "negatively important: unit 1 (alpha -0.3), unit 4 (alpha -0.1)")
    only_positive = top_neurons(torch.tensor([0.0, 1.0]), k=5)
    assert only_positive.sentence() == ("Positively important: unit 1 (alpha 1); "
                                        "negatively important: none")


def test_network_dissection_tally_csv_is_read_with_units_from_one(tmp_path: Path) -> None:
    path = tmp_path / "tally.csv"
    rows = ["unit,category,label,score,object-label,object-iou"]
    rows += [f"{u + 1},{cat},{label},{iou},{label},{iou}" for u, cat, label, iou in NAMES]
    path.write_text("\n".join(rows) + "\n")
    names = neuron_names(path)
    assert names.unit_base == 1 and len(names) == 6
    assert names.get(2).label == "shelf" and names.get(2).category == "object"
    text = top_neurons(WEIGHTS, str(path), k=1)
    assert text.sentence() == ("Positively important: shelf (unit 3, IoU 0.08); "
                               "negatively important: sky (unit 2, IoU 0.10)")
    assert text[0, 0].positive[0].channel == 2  # the weight's channel, not the table's unit
    # read as 0-based, every name shifts one channel: the mislabelling unit_base=1 prevents
    zero = top_neurons(WEIGHTS, path, k=1, unit_base=0)[0, 0]
    assert (zero.positive[0].label, zero.negative[0].label) == ("sky", "book")


def test_record_forms_agree_and_duplicates_keep_the_best_iou() -> None:
    dicts = [{"unit": u, "category": c, "label": n, "iou": s} for u, c, n, s in NAMES]
    triples = [(u, n, s) for u, _, n, s in NAMES]
    ref = top_neurons(WEIGHTS, NAMES, k=3).sentences()
    assert top_neurons(WEIGHTS, dicts, k=3).sentences() == ref
    assert top_neurons(WEIGHTS, triples, k=3).sentences() == ref
    by_map = top_neurons(WEIGHTS, {2: "shelf", 1: "sky"}, k=1)  # no IoU: never dropped
    assert by_map.sentence() == ("Positively important: shelf (unit 2); "
                                 "negatively important: sky (unit 1)")
    dup = NeuronNames.from_records([(2, "wall", 0.06), (2, "shelf", 0.3), (2, "floor", 0.1)])
    assert dup.get(2).label == "shelf"


def test_explanation_weights_give_one_set_per_input_and_target() -> None:
    torch.manual_seed(0)
    net = GapNet(channels=6, classes=4)
    x = torch.randn(2, 3, 5, 5)
    expl = mx.GradCAM(net, "features")(x, target=[0, 3])
    text = top_neurons(expl, k=2)
    assert len(text.sets) == 2 and all(len(row) == 2 for row in text.sets)
    for b in range(2):
        for j in range(2):
            w = expl.weights[b, j]
            assert text[b, j].positive[0].channel == int(w.argmax())
            assert text[b, j].negative[0].channel == int(w.argmin())
    assert text.sentences()[1][0] == text.sentence(b=1, k=0)


def test_bad_tables_and_arguments_name_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"names: expected units numbered 0..7 for a layer of 8 "
                                         r"channels \(unit_base = 0\), received unit 8 \('x'\)"):
        top_neurons(WEIGHTS, [(8, "x", 0.5)])
    bad = tmp_path / "names.csv"
    bad.write_text("neuron,concept_name\n1,book\n")
    with pytest.raises(InputError, match=r"names: expected records with a unit and a label.*"
                                         r"names.csv row 0 with keys \['concept_name', 'neuron'\]"):
        neuron_names(bad)
    with pytest.raises(InputError, match="names: expected a CSV file of neuron names"):
        neuron_names(tmp_path / "missing.csv")
    with pytest.raises(InputError, match=r"names: expected an integer unit and a numeric score"):
        neuron_names([("one", "book", 0.1)])
    with pytest.raises(InputError, match="k: expected a positive int, received int 0"):
        top_neurons(WEIGHTS, k=0)
    with pytest.raises(InputError, match="weights: expected finite floating-point importances"):
        top_neurons(torch.tensor([0.1, float("nan")]))
    with pytest.raises(InputTypeError, match="weights: expected an Explanation"):
        top_neurons([0.1, 0.2])
    with pytest.raises(InputError, match="named_only: expected False when no names table"):
        top_neurons(WEIGHTS, named_only=True)
