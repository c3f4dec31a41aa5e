"""A labelled set of videos: which files, with which labels. Decoding is elsewhere.

Two layouts:

- a folder ``root/<label>/<file>.mp4`` (as torchvision's ``ImageFolder``),
  items sorted by label then file name;
- a list file: CSV rows ``path,label`` (an optional ``path,label`` header) or a
  JSON list of ``{"path": ..., "label": ...}`` objects or ``[path, label]``
  pairs, in file order; relative paths are relative to the list file's folder.

Label indices come from ``classes`` when given (e.g. the model's class names,
so that index = the model's output index) and otherwise from the sorted set of
labels found.

    items = list_videos("clips/", classes=kinetics_classes)
    items[0]  # VideoItem(path=.../arm wrestling/a.mp4, label='arm wrestling', label_index=6)
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmexplain.errors import bad_type, bad_value

__all__ = ["VIDEO_EXTENSIONS", "VideoItem", "expand_video_inputs", "list_videos", "output_stems"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")


@dataclass(frozen=True)
class VideoItem:
    """One video: its path, its label and the label's class index."""

    path: Path
    label: str
    label_index: int


def _from_folder(root: Path, extensions: tuple[str, ...]) -> list[tuple[Path, str]]:
    pairs = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(label_dir.iterdir()):
            if path.is_file() and path.suffix.lower() in extensions:
                pairs.append((path, label_dir.name))
    return pairs


def _from_csv(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    for i, row in enumerate(rows):
        if len(row) < 2:
            raise bad_value("source", f"CSV rows 'path,label' in {path}",
                            f"row {i + 1}: {row!r}", raw=True)
    return [(r[0].strip(), r[1].strip()) for r in rows]


def _from_json(path: Path) -> list[tuple[str, str]]:
    try:
        entries = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise bad_value("source", "a JSON list of {path, label}", str(path), raw=True) from exc
    if not isinstance(entries, list):
        raise bad_value("source", f"a JSON list of {{path, label}} in {path}", entries)
    pairs = []
    for i, entry in enumerate(entries):
        if isinstance(entry, Mapping) and "path" in entry and "label" in entry:
            pairs.append((str(entry["path"]), str(entry["label"])))
        elif isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2:
            pairs.append((str(entry[0]), str(entry[1])))
        else:
            raise bad_value("source", f"{{path, label}} objects or [path, label] pairs in {path}",
                            f"entry {i}: {entry!r}", raw=True)
    return pairs


def _class_index(classes: Any, labels: list[str]) -> dict[str, int]:
    if classes is None:
        return {label: i for i, label in enumerate(sorted(set(labels)))}
    if isinstance(classes, Mapping):
        index = {str(k): int(v) for k, v in classes.items()}
    elif isinstance(classes, Sequence) and not isinstance(classes, str):
        index = {str(name): i for i, name in enumerate(classes)}
    else:
        raise bad_type("classes", "None, a sequence of class names or a {name: index} mapping",
                       classes)
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise bad_value("classes", "every label of the videos", f"no class for {unknown[:5]}",
                        raw=True)
    return index


def list_videos(source: str | Path, classes: Sequence[str] | Mapping[str, int] | None = None,
                extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[VideoItem]:
    """The labelled videos of a folder (``root/<label>/<file>``) or a CSV/JSON list."""
    source = Path(source)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if source.is_dir():
        pairs = _from_folder(source, exts)
        if not pairs:
            raise bad_value("source", f"videos ({', '.join(exts)}) in <label>/ subfolders",
                            str(source), raw=True)
    elif source.is_file() and source.suffix.lower() in (".csv", ".json"):
        raw = _from_csv(source) if source.suffix.lower() == ".csv" else _from_json(source)
        if not raw:
            raise bad_value("source", "at least one 'path,label' entry", str(source), raw=True)
        pairs = [((source.parent / p) if not Path(p).is_absolute() else Path(p), label)
                 for p, label in raw]
        missing = [str(p) for p, _ in pairs if not p.is_file()]
        if missing:
            raise bad_value("source", "paths to existing video files",
                            f"{len(missing)} missing, e.g. {missing[0]}", raw=True)
    else:
        raise bad_value("source", "a folder root/<label>/<video> or a .csv/.json list",
                        str(source), raw=True)
    index = _class_index(classes, [label for _, label in pairs])
    return [VideoItem(path, label, index[label]) for path, label in pairs]


# --------------------------------------------------------------------------- command inputs


def expand_video_inputs(inputs: Sequence[str | Path],
                        extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[Path]:
    """Files, folders and glob patterns -> the video files, each once, in order.

    A file is taken as it is (whatever its extension: the decoder says whether it
    is a video); a folder gives every file with a video extension under it
    (recursively, sorted); a pattern with ``*``, ``?`` or ``[`` gives its matches
    (sorted; folders among them expanded). Anything that matches nothing raises
    an error naming it.
    """
    import glob

    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    found: list[Path] = []
    for entry in inputs:
        text = str(entry)
        if Path(text).exists():
            matches = [Path(text)]
        elif any(c in text for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            if not matches:
                raise bad_value("input", "a video file, a folder of videos or a glob pattern",
                                f"{text!r}: the pattern matches no file", raw=True)
        else:
            raise bad_value("input", "a video file, a folder of videos or a glob pattern",
                            f"{text!r}: no such file or folder", raw=True)
        files = []
        for match in matches:
            if match.is_dir():
                files.extend(sorted(p for p in match.rglob("*")
                                    if p.is_file() and p.suffix.lower() in exts))
            elif match.is_file() and (match == Path(text) or match.suffix.lower() in exts):
                files.append(match)
        if not files:
            raise bad_value("input", f"videos ({', '.join(exts)})",
                            f"{text!r}, which holds none", raw=True)
        found.extend(files)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return [Path(p) for p in unique]


def output_stems(paths: Sequence[Path]) -> list[str]:
    """A distinct output name per video: its stem when stems are distinct, else its path
    relative to the videos' common folder with separators as ``__`` (``a/clip.mp4`` and
    ``b/clip.mp4`` -> ``a__clip``, ``b__clip``; ``clip.mp4`` and ``clip.avi`` -> ``clip.mp4``,
    ``clip.avi``); names still equal after that get ``-2``, ``-3``, ... in input order."""
    import os
    import re

    paths = [Path(p).resolve() for p in paths]
    stems = [p.stem for p in paths]
    if len(set(stems)) < len(stems):
        root = Path(os.path.commonpath([str(p.parent) for p in paths]))
        same = {s for s in stems if stems.count(s) > 1}

        def name(path: Path, stem: str) -> str:
            if stem not in same:
                return stem
            relative = path.relative_to(root)
            suffixes = {q.suffix for q, t in zip(paths, stems) if t == stem}
            return str(relative if len(suffixes) > 1 else relative.with_suffix(""))

        stems = [re.sub(r"[\\/]+", "__", name(p, s)) for p, s in zip(paths, stems)]
    seen: dict[str, int] = {}
    out = []
    for stem in stems:
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return out
