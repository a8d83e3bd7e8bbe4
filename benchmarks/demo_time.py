"""How long the README's first command takes once its install step is done: the demo, timed whole.

    .venv/bin/python -m benchmarks.demo_time [--set key=value ...]

Runs `python -m simulations.demo` as `make demo` does once .venv exists, in a fresh process, so Ray's
start, the backbone's load and every contender count. Its output goes to a temporary out_dir, and the
report's own seconds per contender are read back to show where the time goes. The target (issue 12)
is 5 minutes on a 2-core machine; the load line says how busy the machine was with other work.
Writes <results>/demo_time.md and .json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from benchmarks.scaffold import Run, arguments, command
from shared.config import PROJECT_ROOT
from shared.metrics import to_markdown

TARGET_S = 300.0


def main(argv: list[str] | None = None) -> Path:
    args = arguments(__doc__).parse_args(argv)
    with tempfile.TemporaryDirectory() as out, Run("benchmarks.demo_time", argv) as run:
        sets = [f"--set={s}" for s in [*args.set, f"federation.out_dir={out}"]]
        subprocess.run([sys.executable, "-m", "simulations.demo", *sets], cwd=PROJECT_ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report = json.loads((Path(out) / "report.json").read_text())
    rows = pd.DataFrame(report["overall"])[["model", "seconds"]].sort_values("seconds", ascending=False)
    verdict = "within" if run.wall <= TARGET_S else "over"
    body = "\n".join([
        f"## `make demo` after install: {run.wall:.0f} s, {verdict} the {TARGET_S:.0f} s target", "",
        "Seconds each contender took inside that run (a `_personal` row's include its federation's; the rest is process start, "
        "Ray, data, baselines' set-up and the report):", "",
        to_markdown(rows.reset_index(drop=True)),
    ])
    extra = [f"overrides {args.set or 'none'}; {report['context']['title']}"]
    return run.save("demo_time", "The demo, timed as a whole process", extra, body,
                    {"wall_s": run.wall, "target_s": TARGET_S, "seconds": rows.to_dict(orient="records")}, args.results)


if __name__ == "__main__":
    command(main)
