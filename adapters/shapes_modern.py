"""The modern shapes-world models shipped in the package, as Hugging Face folders.

    adapter = get_adapter("shapes-vlm")       # = get_adapter("llava", path=<the folder>)
    adapter = get_adapter("shapes-video")     # = get_adapter("videomae", path=<the folder>)
    mmexplain caption scene.png --model shapes-vlm
    mmexplain caption scene.png --weights <the folder>     # the same model, by its path

- ``"shapes-vlm"``: a ``LlavaForConditionalGeneration`` (CLIP vision tower on 64-px
  scenes, 8 x 8 image tokens, LLaVA's projector, a two-layer Llama, a word-level
  tokenizer over the shapes vocabulary, a ``LlavaProcessor``) that captions the scenes
  ("Describe the image.") and answers the shapes questions generatively;
- ``"shapes-video"``: a ``VideoMAEForVideoClassification`` (16 frames of 64 px, tubelets
  4 x 8 x 8) classifying the clips' actions.

Both folders are in ``mmexplain/weights/`` (``scripts/train_shapes_modern.py`` writes
them). The factories only name the folder: the llava and videomae factories load it
with ``from_pretrained(local_files_only=True)``, exactly as a downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmexplain.adapters import get_adapter, register_adapter
from mmexplain.errors import InputError

#: adapter name -> (the folder in mmexplain/weights/, the family adapter that loads it)
FOLDERS = {"shapes-vlm": ("shapes-vlm", "llava"), "shapes-video": ("shapes-video", "videomae")}


def shipped_folder(name: str) -> Path:
    """The installed folder of the shipped model ``name``, or an InputError saying how to
    build it."""
    from mmexplain.adapters.shapes import weights_dir

    folder = weights_dir() / FOLDERS[name][0]
    if not (folder / "config.json").is_file():
        raise InputError(f"weights: expected the shipped {name} model in {str(folder)!r}, "
                         "received a folder without config.json (build it with python "
                         "scripts/train_shapes_modern.py)")
    return folder


def _factory(name: str) -> Any:
    family = FOLDERS[name][1]

    def build(path: Any = None, **options: Any) -> Any:
        return get_adapter(family, path=shipped_folder(name) if path is None else path,
                           **options)

    build.__doc__ = (f"the shipped shapes-world {family} model (mmexplain/weights/"
                     f"{FOLDERS[name][0]}); path= another folder of that family")
    return build


for _name in FOLDERS:
    register_adapter(_name)(_factory(_name))

__all__ = ["FOLDERS", "shipped_folder"]
