"""The long fuzzing run: the properties of tests/test_fuzz.py with N random examples each.

    nice -n 5 python scripts/fuzz.py --examples 7000            # every property
    python scripts/fuzz.py --examples 200 --only engine cli      # some of them

Prints, per property, the examples run (and how many of them raised the project's
documented error), then every failure: an undocumented exception or a non-finite result,
with Hypothesis's falsifying example. Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="examples per property")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run the properties whose names contain one of these words")
    parser.add_argument("--shrink", action="store_true",
                        help="shrink failing examples (slow: minutes for an engine failure)")
    args = parser.parse_args(argv)
    os.environ["MMX_FUZZ_EXAMPLES"] = str(args.examples)
    os.environ["MMX_FUZZ_RANDOM"] = "1"  # fresh random examples, not CI's fixed ones
    os.environ["MMX_FUZZ_SHRINK"] = "1" if args.shrink else "0"
    tests = Path(__file__).resolve().parents[1] / "tests"
    sys.path.insert(0, str(tests))
    import test_fuzz  # noqa: E402  (reads the settings above on import)

    properties = [(name, fn) for name, fn in vars(test_fuzz).items()
                  if name.startswith("test_") and hasattr(fn, "hypothesis")
                  and (not args.only or any(w in name for w in args.only))]
    failures: list[tuple[str, str]] = []
    ran: dict[str, int] = {}
    start = time.perf_counter()
    for name, fn in properties:
        ran[name] = 0
        inner = fn.hypothesis.inner_test  # counted: the examples Hypothesis really ran

        def counted(*a: object, _name: str = name, _inner: object = inner, **k: object) -> None:
            ran[_name] += 1
            return _inner(*a, **k)  # type: ignore[operator]

        fn.hypothesis.inner_test = counted
        before = sum(v for k, v in test_fuzz.COUNTS.items() if "(" not in k and "exit" not in k)
        t0 = time.perf_counter()
        try:
            fn()
            status = "ok"
        except Exception:  # noqa: BLE001 - a failure is what the run reports
            failures.append((name, traceback.format_exc()))
            status = "FAILED"
            print(f"=== {name}\n{failures[-1][1]}", flush=True)
        runs = sum(v for k, v in test_fuzz.COUNTS.items() if "(" not in k and "exit" not in k)
        print(f"{name}: {status}, {ran[name]} examples, {runs - before} calls in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    print("\ncalls per target (documented errors in brackets):")
    counts = test_fuzz.COUNTS
    for key in sorted(k for k in counts if "(" not in k):
        print(f"  {key}: {counts[key]} ({counts.get(key + ' (documented error)', 0)})")
    print(f"\n{len(properties)} properties x up to {test_fuzz.EXAMPLES} examples: "
          f"{sum(ran.values())} examples, "
          f"{sum(v for k, v in counts.items() if '(' not in k and 'exit' not in k)} calls; "
          f"{len(failures)} failures; {time.perf_counter() - start:.0f} s")
    print("failed: " + (", ".join(name for name, _ in failures) or "none"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
