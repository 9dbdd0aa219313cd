"""Type-check ``cachedata/`` with mypy against a baseline that may only shrink.

The baseline (``.ci/mypy-baseline.txt``) lists known errors as ``path: message [code]``
without line numbers, so that unrelated edits do not move them. An error not in the
baseline (or more copies of one than it lists) fails; errors fixed since are reported,
and ``--update`` rewrites the baseline, which is refused when its total would grow
(moving code renames its errors, so the total is what may only shrink).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / ".ci" / "mypy-baseline.txt"
_LINE = re.compile(r"^(?P<path>[^:]+):\d+(?::\d+)?: error: (?P<message>.*)$")


def current() -> collections.Counter[str]:
    """The errors mypy reports now, without line numbers."""
    res = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--no-pretty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if res.returncode not in (0, 1):  # 2: mypy itself failed (a crash, a bad configuration)
        sys.exit(f"mypy failed (exit {res.returncode}):\n{res.stdout}{res.stderr}")
    errors: collections.Counter[str] = collections.Counter()
    for line in res.stdout.splitlines():
        m = _LINE.match(line)
        if m:
            message = re.sub(r"\bline \d+", "line N", m["message"])  # "already defined on line 497"
            errors[f"{m['path']}: {message}"] += 1
    return errors


def baseline() -> collections.Counter[str]:
    if not BASELINE.exists():
        return collections.Counter()
    lines = BASELINE.read_text().splitlines()
    return collections.Counter(ln for ln in lines if ln.strip() and not ln.startswith("#"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--update", action="store_true", help="rewrite the baseline (only to shrink it)")
    args = ap.parse_args()
    now, known = current(), baseline()
    new = now - known
    fixed = known - now
    if args.update:
        # Moving code renames its errors' paths, so the rule is on the total: it may not grow.
        if BASELINE.exists() and sum(now.values()) > sum(known.values()):
            print(
                f"refusing to grow the baseline from {sum(known.values())} to {sum(now.values())} errors; "
                "fix these instead:",
                file=sys.stderr,
            )
            for e in sorted(new.elements()):
                print(f"  {e}", file=sys.stderr)
            return 1
        header = "# mypy errors known on main, without line numbers; may only shrink (.ci/mypy_baseline.py)\n"
        BASELINE.write_text(header + "".join(f"{e}\n" for e in sorted(now.elements())))
        print(f"baseline: {sum(now.values())} errors ({sum(fixed.values())} fewer)")
        return 0
    if new:
        print(f"mypy: {sum(new.values())} new error(s) not in {BASELINE.relative_to(ROOT)}:", file=sys.stderr)
        for e in sorted(new.elements()):
            print(f"  {e}", file=sys.stderr)
        print(
            "fix them (run `.venv/bin/mypy` for line numbers); the baseline may only shrink", file=sys.stderr
        )
        return 1
    msg = f"mypy: no new errors ({sum(now.values())} known in the baseline)"
    if fixed:
        msg += (
            f"; {sum(fixed.values())} fixed: shrink it with `.venv/bin/python .ci/mypy_baseline.py --update`"
        )
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
