"""The ``mmexplain`` command: one sub-command per job, each in its own module.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Modules are listed here so ``mmexplain --help`` shows
every job; a module is imported only when its command runs or help is built.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mmexplain.errors import MMExplainError

COMMANDS: dict[str, str] = {
    "demo": "mmexplain.demo",
    "caption": "mmexplain.commands",
    "vqa": "mmexplain.commands",
    "video": "mmexplain.commands",
    "classify": "mmexplain.commands",
    "eval": "mmexplain.evaluate",
    "serve": "mmexplain.serve",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmexplain",
        description="Grad-CAM and Grad-CAM++ explanations for captioners, VQA models and "
        "video action classifiers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # that job is not part of this build
        spec = getattr(module, "COMMANDS", {}).get(name, module)
        cmd = sub.add_parser(name, help=spec.HELP, description=spec.HELP)
        spec.add_arguments(cmd)
        cmd.set_defaults(_run=spec.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from mmexplain.process import skip_triton

    skip_triton()  # no CUDA: Triton is dead weight (before the commands import torchvision)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except MMExplainError as exc:
        print(f"mmexplain {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a hint, not a traceback
        hint = (" (what was finished is recorded: run the same command with --resume to go "
                "on)" if args.command == "eval" else "")
        print(f"mmexplain {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
