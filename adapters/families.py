"""Which adapter runs a Hugging Face model folder: its family, read from config.json.

    from mmexplain.adapters.families import family_of, register_family
    register_family("blip", "blip-caption", tasks=("caption",))       # in an adapter module
    name = family_of("/models/blip-vqa-base", task="vqa")             # -> "blip-vqa"
    adapter = get_adapter(name, path="/models/blip-vqa-base")

A family is keyed by the config's ``architectures`` class name (tried first:
``BlipForQuestionAnswering`` and ``BlipForConditionalGeneration`` share the
``model_type`` "blip") or by its ``model_type``. Adapter modules register their
families on import, beside their ``@register_adapter`` factories; the registry
imports every adapter module first, so :data:`FAMILIES` is complete when read
through :func:`families`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmexplain.errors import InputError, bad_type

#: model_type or architecture class name -> registered adapter name
FAMILIES: dict[str, str] = {}
#: the same key -> the commands (tasks) that family serves
TASKS: dict[str, tuple[str, ...]] = {}


def register_family(key: str, adapter_name: str, tasks: Sequence[str] = ("caption", "vqa")
                    ) -> None:
    """Say that folders whose config names ``key`` (a ``model_type`` or an architecture
    class name) are run by the adapter ``adapter_name``, for ``tasks``."""
    if not isinstance(key, str) or not key or not isinstance(adapter_name, str):
        raise bad_type("key", "a model_type or architecture name and an adapter name (str)",
                       (key, adapter_name))
    if FAMILIES.get(key, adapter_name) != adapter_name:
        raise InputError(f"key: expected a family not yet registered, received {key!r}, "
                         f"already run by {FAMILIES[key]!r}")
    FAMILIES[key] = adapter_name
    TASKS[key] = tuple(tasks)


def families() -> dict[str, str]:
    """Every registered family (after the adapter modules registered theirs)."""
    from mmexplain.adapters import list_adapters

    list_adapters()  # imports every adapter module
    return dict(FAMILIES)


def read_config(path: Any, arg: str = "path") -> dict[str, Any]:
    """The folder's config.json as a dict, or an InputError naming ``arg``."""
    if not isinstance(path, (str, Path)):
        raise bad_type(arg, "a local folder (str or Path) holding a Hugging Face model", path)
    folder = Path(path)
    config = folder / "config.json"
    if not folder.is_dir() or not config.is_file():
        why = "there is no such folder" if not folder.is_dir() else "it has no config.json"
        raise InputError(f"{arg}: expected a local folder holding a Hugging Face model "
                         f"(config.json and weights, as save_pretrained writes them), received "
                         f"{str(path)!r}: {why}")
    try:
        data = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{arg}: expected a readable config.json in {str(path)!r}, received "
                         f"one that is not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{arg}: expected a config.json holding an object in {str(path)!r}, "
                         f"received {type(data).__name__}")
    return data


def found_in(config: dict[str, Any]) -> str:
    """'model_type X (architectures A, B)': what a config says it holds, for messages."""
    arch = ", ".join(str(a) for a in config.get("architectures") or []) or "none listed"
    return f"model_type {config.get('model_type')!r} (architectures: {arch})"


def family_of(path: Any, task: str | None = None, arg: str = "path") -> str:
    """The registered adapter name for the model folder ``path`` (for ``task`` if given).

    Raises an InputError naming ``arg``, what the folder holds and what is
    supported when no family (or none serving ``task``) matches.
    """
    config = read_config(path, arg)
    known = families()
    keys = [str(a) for a in config.get("architectures") or []] + [str(config.get("model_type"))]
    matches = [k for k in keys if k in known]
    served = [k for k in matches if task is None or task in TASKS.get(k, ())]
    if served:
        return known[served[0]]
    if matches:
        tasks = ", ".join(TASKS.get(matches[0], ()))
        raise InputError(f"{arg}: expected a model folder that mmexplain {task} can run, "
                         f"received {str(path)!r}, which holds {found_in(config)}: adapter "
                         f"{known[matches[0]]!r}, which serves {tasks or 'no command'}, not "
                         f"{task}")
    supported = ", ".join(sorted({*known}))
    raise InputError(f"{arg}: expected a model folder of a supported family "
                     f"({supported or 'none registered'}), received {str(path)!r}, which holds "
                     f"{found_in(config)}")


def check_family(path: Any, adapter_name: str, arg: str = "path") -> None:
    """An InputError when the folder ``path`` holds a family another adapter runs
    (``--model`` and ``--weights`` disagree); folders of unregistered families pass
    (the adapter's own loader then says what it expected)."""
    config = read_config(path, arg)
    known = families()
    keys = [str(a) for a in config.get("architectures") or []] + [str(config.get("model_type"))]
    owners = [known[k] for k in keys if k in known]
    if owners and adapter_name not in owners:
        raise InputError(f"{arg}: expected a folder of a model {adapter_name!r} runs, received "
                         f"{str(path)!r}, which holds {found_in(config)}: a folder for "
                         f"{owners[0]!r}")


__all__ = ["FAMILIES", "TASKS", "check_family", "family_of", "families", "found_in",
           "read_config", "register_family"]
