"""Textual explanations (Grad-CAM paper, sec. 7): the most important named neurons.

The importance of channel k of the target layer for a target is alpha_k
(Grad-CAM eq. 1; ``Explanation.weights`` (B, K, C), which for Grad-CAM++ holds
the non-negative w_k of its eq. 20). The top-k channels by alpha (alpha > 0:
their presence raises the score) and the bottom-k (alpha < 0: their absence
raises it) are joined with neuron names, as Network Dissection (Bau et al.)
publishes them: one row per unit with its concept ``label``, the concept's
``category`` and the ``score`` = IoU between the unit's thresholded activation
and the concept's segmentation. Names whose IoU is under a threshold (0.05 in
the paper) are dropped, as noise.

    names = neuron_names("dissection/conv5/tally.csv")  # units numbered from 1 there
    text = top_neurons(expl.weights, names, k=5)
    text.sentence()  # "Positively important: book (unit 12, IoU 0.12), ...; negatively ..."

Unit numbering: Network Dissection writes ``tally.csv`` with units numbered
from 1 (``unit + 1``), so a CSV is read with ``unit_base=1``; in-memory records
default to 0-based units (channel indices). Results keep both the channel
(index into the weights' C axis) and the unit as the table numbers it.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmexplain.engine import Explanation
from mmexplain.errors import InputError, bad_type, bad_value, describe

IOU_THRESHOLD = 0.05  # Grad-CAM paper, sec. 7 (footnote 7)

_UNIT = ("unit", "channel")
_LABEL = ("label", "name", "concept")
_CATEGORY = ("category",)
_SCORE = ("score", "iou")


# --------------------------------------------------------------------------- name tables


@dataclass(frozen=True)
class NeuronName:
    """One unit's name: its concept label, the concept's category and the IoU."""

    unit: int
    label: str
    category: str | None = None
    iou: float | None = None


class NeuronNames:
    """A table channel (0-based index into the layer's C axis) -> :class:`NeuronName`.

    ``unit_base`` is the number the table gives channel 0 (1 for Network
    Dissection's ``tally.csv``). When a unit appears more than once, the name
    with the highest IoU is kept.
    """

    def __init__(self, names: Iterable[NeuronName], unit_base: int = 0) -> None:
        if isinstance(unit_base, bool) or not isinstance(unit_base, int) or unit_base < 0:
            raise bad_value("unit_base", "a non-negative int (0 or 1)", unit_base)
        self.unit_base = unit_base
        self._by_channel: dict[int, NeuronName] = {}
        for name in names:
            channel = name.unit - unit_base
            if channel < 0:
                raise bad_value("names", f"units numbered from unit_base = {unit_base}",
                                f"unit {name.unit} ({name.label!r})", raw=True)
            old = self._by_channel.get(channel)
            if old is None or (name.iou or 0.0) > (old.iou or 0.0):
                self._by_channel[channel] = name

    def __len__(self) -> int:
        return len(self._by_channel)

    def get(self, channel: int) -> NeuronName | None:
        return self._by_channel.get(channel)

    @property
    def max_channel(self) -> int:
        return max(self._by_channel, default=-1)

    @classmethod
    def from_csv(cls, path: str | os.PathLike, unit_base: int = 1) -> "NeuronNames":
        """Read a CSV with a header: Network Dissection's ``tally.csv`` columns
        ``unit,category,label,score`` (further columns are ignored); ``channel``,
        ``name``/``concept`` and ``iou`` are accepted as column names too."""
        path = Path(path)
        if not path.is_file():
            raise bad_value("names", "a CSV file of neuron names (Network Dissection's "
                            "tally.csv)", f"{str(path)!r}, which is not a file", raw=True)
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return cls.from_records(rows, unit_base=unit_base, source=f"{path.name}")

    @classmethod
    def from_records(cls, records: Iterable[Any], unit_base: int = 0,
                     source: str = "names") -> "NeuronNames":
        """From dicts (the CSV's column names) or tuples ``(unit, label)``,
        ``(unit, label, iou)`` or ``(unit, category, label, score)`` (tally.csv's order)."""
        return cls((_record(r, i, source) for i, r in enumerate(records)), unit_base)


def _pick(row: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if key in row and row[key] not in (None, ""):
            return row[key]
    return None


def _record(row: Any, index: int, source: str) -> NeuronName:
    where = f"{source} row {index}"
    if isinstance(row, Mapping):
        unit, label = _pick(row, _UNIT), _pick(row, _LABEL)
        category, score = _pick(row, _CATEGORY), _pick(row, _SCORE)
        if unit is None or label is None:
            raise bad_value("names", "records with a unit and a label (tally.csv columns "
                            "unit,category,label,score)",
                            f"{where} with keys {sorted(row)}", raw=True)
    elif isinstance(row, (tuple, list)) and 2 <= len(row) <= 4:
        category = score = None
        if len(row) == 2:
            unit, label = row
        elif len(row) == 3:
            unit, label, score = row
        else:
            unit, category, label, score = row
    else:
        raise bad_type("names", "dicts or (unit, label[, iou]) / (unit, category, label, "
                       "score) tuples", row)
    try:
        unit_int = int(unit)
        iou = None if score is None else float(score)
    except (TypeError, ValueError) as exc:
        raise bad_value("names", "an integer unit and a numeric score/IoU",
                        f"{where}: unit {unit!r}, score {score!r}", raw=True) from exc
    if iou is not None and not math.isfinite(iou):
        raise bad_value("names", "a finite score/IoU", f"{where}: {score!r}", raw=True)
    return NeuronName(unit=unit_int, label=str(label),
                      category=None if category is None else str(category), iou=iou)


def neuron_names(source: Any, *, unit_base: int | None = None) -> NeuronNames:
    """A name table from a CSV path (``unit_base`` 1 by default, as tally.csv),
    a list of dicts/tuples or a mapping {unit: label} (0 by default)."""
    if isinstance(source, NeuronNames):
        return source
    if isinstance(source, (str, os.PathLike)):
        return NeuronNames.from_csv(source, 1 if unit_base is None else unit_base)
    base = 0 if unit_base is None else unit_base
    if isinstance(source, Mapping):
        return NeuronNames.from_records(list(source.items()), base)
    if isinstance(source, Iterable):
        return NeuronNames.from_records(source, base)
    raise bad_type("names", "a CSV path, a list of dicts/tuples, a {unit: label} mapping or "
                   "NeuronNames", source)


# --------------------------------------------------------------------------- explanations


@dataclass(frozen=True)
class Neuron:
    """One important channel: its importance and, when the table has it, its name.

    ``named`` is False when the table has no name for it or the name's IoU is
    under the threshold (the name is then dropped from the sentence).
    """

    channel: int
    unit: int
    weight: float
    label: str | None = None
    category: str | None = None
    iou: float | None = None
    named: bool = False

    def describe(self) -> str:
        if not self.named:
            return f"unit {self.unit} (alpha {self.weight:.3g})"
        iou = "" if self.iou is None else f", IoU {self.iou:.2f}"
        return f"{self.label} (unit {self.unit}{iou})"


@dataclass(frozen=True)
class NeuronSet:
    """The top-k positively and negatively important channels for one input and target."""

    positive: tuple[Neuron, ...]
    negative: tuple[Neuron, ...]
    has_names: bool = False
    iou_threshold: float = IOU_THRESHOLD

    def _phrase(self, neurons: tuple[Neuron, ...]) -> str:
        if not neurons:
            return "none"
        shown = [n for n in neurons if n.named] if self.has_names else list(neurons)
        if not shown:
            return f"no unit named with IoU >= {self.iou_threshold:g}"
        return ", ".join(n.describe() for n in shown)

    def sentence(self) -> str:
        """"Positively important: book (unit 12, IoU 0.12), ...; negatively important: ..."."""
        return (f"Positively important: {self._phrase(self.positive)}; "
                f"negatively important: {self._phrase(self.negative)}")


@dataclass(frozen=True)
class TextualExplanation:
    """:class:`NeuronSet` per input and target: ``sets[b][k]``."""

    sets: tuple[tuple[NeuronSet, ...], ...]

    def __getitem__(self, index: tuple[int, int]) -> NeuronSet:
        b, k = index
        return self.sets[b][k]

    def sentence(self, b: int = 0, k: int = 0) -> str:
        return self.sets[b][k].sentence()

    def sentences(self) -> list[list[str]]:
        return [[s.sentence() for s in row] for row in self.sets]


def _weights(weights: Any) -> torch.Tensor:
    if isinstance(weights, Explanation):
        weights = weights.weights
    if not isinstance(weights, torch.Tensor):
        raise bad_type("weights", "an Explanation or its weights tensor (B, K, C)", weights)
    if weights.dim() == 1:
        weights = weights.view(1, 1, -1)
    if weights.dim() != 3 or weights.shape[-1] == 0:
        raise bad_value("weights", "channel importances (B, K, C) or (C,)", weights)
    if not weights.is_floating_point() or not torch.isfinite(weights).all():
        raise bad_value("weights", "finite floating-point importances", describe(weights),
                        raw=True)
    return weights.detach().double().cpu()


def top_neurons(weights: Explanation | torch.Tensor, names: Any = None, k: int = 5,
                iou_threshold: float = IOU_THRESHOLD, *, named_only: bool = False,
                unit_base: int | None = None) -> TextualExplanation:
    """The top-k and bottom-k channels by importance, with their names (sec. 7).

    ``weights``: an :class:`Explanation` or its ``weights`` (B, K, C) (or one (C,)
    vector). ``names``: None, or a table for :func:`neuron_names` (a tally.csv
    path, records, a mapping, :class:`NeuronNames`). Positive channels have
    alpha > 0, sorted by decreasing alpha; negative ones alpha < 0, most negative
    first; ties keep channel order. A name with IoU < ``iou_threshold`` is
    dropped (``Neuron.named`` False, left out of the sentence). ``named_only``
    picks the top-k among channels with a kept name instead.
    """
    w = _weights(weights)  # (B, K, C) float64
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise bad_value("k", "a positive int", k)
    if (isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float))
            or not 0 <= iou_threshold <= 1):
        raise bad_value("iou_threshold", "a number in [0, 1]", iou_threshold)
    table = None if names is None else neuron_names(names, unit_base=unit_base)
    channels = w.shape[-1]
    if named_only and table is None:
        raise bad_value("named_only", "False when no names table is given", named_only)
    if table is not None and table.max_channel >= channels:
        top = table.get(table.max_channel)
        raise InputError(
            f"names: expected units numbered {table.unit_base}..{channels - 1 + table.unit_base} "
            f"for a layer of {channels} channels (unit_base = {table.unit_base}), received unit "
            f"{top.unit} ({top.label!r}); is the table for another layer, or are its units "
            f"numbered from another base (unit_base=)?")

    base = 0 if table is None else table.unit_base

    def neuron(channel: int, weight: float) -> Neuron:
        name = None if table is None else table.get(channel)
        if name is None:
            return Neuron(channel=channel, unit=channel + base, weight=weight)
        named = name.iou is None or name.iou >= iou_threshold
        return Neuron(channel=channel, unit=name.unit, weight=weight, label=name.label,
                      category=name.category, iou=name.iou, named=named)

    def pick(order: torch.Tensor, row: torch.Tensor, sign: int) -> tuple[Neuron, ...]:
        out: list[Neuron] = []
        for c in order.tolist():
            value = float(row[c])
            if value * sign <= 0:
                break  # sorted: no further channel has the sign
            n = neuron(c, value)
            if named_only and not n.named:
                continue
            out.append(n)
            if len(out) == k:
                break
        return tuple(out)

    sets = []
    for b in range(w.shape[0]):
        row_sets = []
        for j in range(w.shape[1]):
            row = w[b, j]  # (C,)
            down = torch.argsort(row, descending=True, stable=True)  # alpha, largest first
            up = torch.argsort(row, stable=True)  # most negative first
            row_sets.append(NeuronSet(positive=pick(down, row, 1), negative=pick(up, row, -1),
                                      has_names=table is not None, iou_threshold=iou_threshold))
        sets.append(tuple(row_sets))
    return TextualExplanation(sets=tuple(sets))
