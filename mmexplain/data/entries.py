"""The check every JSON reader makes of its entries: a dict with the keys it needs, of
the right types, or an InputError naming the file, the entry, the key and what was
expected (was a raw ``KeyError`` / ``TypeError`` deep in a reader)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mmexplain.errors import InputError, describe

_TYPE_NAMES = {list: "a list", dict: "a dict", int: "an int", str: "a str"}


def check_entry(entry: Any, where: str, fields: Mapping[str, tuple[type, ...]], arg: str,
                path: str | Path, what: str,
                hint: Callable[[dict], str] | None = None) -> None:
    """``entry`` (``where``, e.g. "annotations[3]", of the file ``path``) a dict holding
    ``fields`` of those types (bool is no int); ``what`` says which entries need them
    ("every entry of 'annotations' in a COCO captions file"); ``hint(entry)`` adds to the
    message (e.g. "; it looks like an instances file")."""
    if not isinstance(entry, dict):
        raise InputError(f"{arg}: expected {where} of {str(path)!r} to be a dict with "
                         f"{', '.join(map(repr, fields))}, received {describe(entry)}")
    for name, types in fields.items():
        value = entry.get(name)
        if isinstance(value, bool) or not isinstance(value, types):
            kind = " or ".join(_TYPE_NAMES.get(t, f"a {t.__name__}") for t in types)
            got = "no such key" if name not in entry else describe(value)
            raise InputError(f"{arg}: expected {what} to have {name!r} ({kind}), received "
                             f"{str(path)!r}, whose {where} has {got}"
                             f"{hint(entry) if hint else ''}")


__all__ = ["check_entry"]
