"""Benchmark: strategies side by side on one job, as real processes, in one markdown table.

Runs ``enclavefl run`` (real PS and worker processes) once per ``--variant``, each
variant a list of ``--set`` overrides applied after the common ones, then, with
``--baseline``, ``enclavefl baseline`` once (the job with the common overrides
only: the centralized reference does not depend on a server strategy). Prints a
markdown table: per variant its overrides, rounds (metric rows), final and best
evaluation score, gap to centralized (centralized final minus the variant's
final) and wall seconds of ``enclavefl run``. ``--target`` adds the seconds from
the start of a run to its first evaluation at or above a score (a number, or a
variant's name for that variant's final score): the straggler experiment's
"reaches the sync run's accuracy in less wall time". ``--table-out`` also writes
the table to a file. No network: data comes from ``--data-dir``.

    python bench/strategies.py examples/mnist/iid.yaml --data-dir ../shared/data/mnist \\
        --set faults.byzantine=2 --set faults.attack=scale --baseline \\
        --variant clean=faults.byzantine=0 --variant mean=server.aggregator=mean \\
        --variant median=server.aggregator=median --variant krum=server.aggregator.name=krum,server.aggregator.byzantine=2
    python bench/strategies.py examples/mnist/iid.yaml --data-dir ../shared/data/mnist --set faults.slow=2 \\
        --variant sync=round.mode=sync --variant async=round.mode=async,round.buffer_size=4 --target sync
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Run as a script, this file's folder is on sys.path: share the run and scoring helpers of workloads.py.
from workloads import _rows, _score, run_once

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A comma starts a new override only where a `section.key=` follows, so `task.params.hidden=[64,32]` stays whole.
_NEXT_OVERRIDE = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)+=)")


@dataclass
class Variant:
    name: str
    overrides: list[str]


@dataclass
class Row:
    name: str
    overrides: str
    metric: str = "accuracy"
    rounds: int | None = None
    final: float | None = None
    best: float | None = None
    wall_s: float | None = None
    to_target_s: float | None = None
    error: str | None = None


def parse_variant(spec: str) -> Variant:
    """``NAME=KEY=VALUE[,KEY=VALUE...]`` (or ``NAME`` alone: the job as it is)."""
    name, _, rest = spec.partition("=")
    name = name.strip()
    if not _NAME.match(name):
        raise ValueError(f"--variant {spec!r}: the name {name!r} must be letters, digits and _.- (it names a folder)")
    overrides = [item.strip() for item in _NEXT_OVERRIDE.split(rest)] if rest.strip() else []
    bad = [item for item in overrides if "=" not in item or not item.partition("=")[0].strip()]
    if bad:
        raise ValueError(f"--variant {spec!r}: {bad[0]!r} is not section.key=value")
    return Variant(name, overrides)


def _set_args(overrides: list[str]) -> list[str]:
    out: list[str] = []
    for item in overrides:
        out += ["--set", item]
    return out


def seconds_to(out: Path, started_epoch: float, target: float) -> float | None:
    """Seconds from ``started_epoch`` to the first metrics row scoring at least ``target`` (None: never)."""
    rows = _rows(out / "metrics.jsonl")
    metric, _, _ = _score(rows)
    for row in rows:
        value = row.get(f"eval_{metric}")
        if value is not None and float(value) >= target:
            return float(row["time"]) - started_epoch
    return None


def run_variant(job: Path, common: list[str], variant: Variant, out: Path) -> tuple[Row, float]:
    """One ``enclavefl run`` (and its report) into ``out``; a failed run gives a row saying so."""
    row = Row(variant.name, ", ".join(variant.overrides) or "(job as is)")
    started_epoch = time.time()
    try:
        outcome = run_once(job, _set_args(common + variant.overrides), out, False)
    except subprocess.CalledProcessError as exc:
        row.error = f"exit {exc.returncode}"
        return row, started_epoch
    except (OSError, IndexError) as exc:  # no metrics file, or no evaluated round in it
        row.error = f"no scores: {exc}"
        return row, started_epoch
    row.metric, row.rounds = outcome.metric, outcome.rounds
    row.final, row.best, row.wall_s = outcome.fed_final, outcome.fed_best, outcome.fed_wall
    return row, started_epoch


def run_baseline(job: Path, common: list[str], out: Path) -> Row:
    """``enclavefl baseline`` once into ``out`` (one thread, as bench/workloads.py runs it)."""
    row = Row("centralized", "(baseline, common overrides)")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.monotonic()
    try:
        subprocess.run([sys.executable, "-m", "enclavefl", "baseline", str(job), "--out", str(out),
                        *_set_args(common)], check=True, env=env, stdout=subprocess.DEVNULL)
    except subprocess.CalledProcessError as exc:
        row.error = f"exit {exc.returncode}"
        return row
    row.wall_s = time.monotonic() - t0
    rows = _rows(out / "baseline.jsonl")
    row.metric, row.final, row.best = _score(rows)
    row.rounds = len(rows)
    return row


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[Row], baseline: Row | None, target: float | None) -> str:
    """The markdown table: one line per variant, then the centralized reference."""
    metric = next((r.metric for r in rows if r.error is None), "accuracy")
    head = ["variant", "overrides", "rounds", f"final {metric}", f"best {metric}", "gap to centralized (final)",
            "wall s"]
    if target is not None:
        head.append(f"s to {metric} >= {target:.4f}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cen = baseline.final if baseline is not None and baseline.error is None else None
    for r in [*rows, *([baseline] if baseline is not None else [])]:
        if r.error is not None:
            cells = [r.name, r.overrides, f"failed ({r.error})", *["n/a"] * (len(head) - 3)]
        else:
            gap = None if cen is None or r is baseline or r.final is None else cen - r.final
            cells = [r.name, r.overrides, str(r.rounds), _fmt(r.final, ".4f"), _fmt(r.best, ".4f"),
                     "n/a" if gap is None else f"{gap:+.4f}", _fmt(r.wall_s, ".0f")]
            if target is not None:
                cells.append("n/a" if r is baseline else _fmt(r.to_target_s, ".0f") if r.to_target_s is not None
                             else "not reached")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", type=Path, help="example job YAML")
    parser.add_argument("--data-dir", help="task.data_dir for every run (default: the job's own)")
    parser.add_argument("--variant", dest="variants", action="append", default=[], required=True,
                        metavar="NAME=KEY=VALUE[,KEY=VALUE...]", help="one run with these overrides (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override for every run, applied before a variant's own")
    parser.add_argument("--baseline", action="store_true", help="also run the centralized baseline, once")
    parser.add_argument("--target", metavar="SCORE|VARIANT",
                        help="add seconds to reach this score (or that variant's final score)")
    parser.add_argument("--out", type=Path, help="run directories go here (default runs/strategies-<job>-<time>)")
    parser.add_argument("--table-out", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args()
    try:
        variants = [parse_variant(spec) for spec in args.variants]
    except ValueError as exc:
        parser.error(str(exc))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        parser.error(f"--variant names must differ, got {names}")
    target_value: float | None = None
    if args.target is not None and args.target not in names:
        try:
            target_value = float(args.target)
        except ValueError:
            parser.error(f"--target {args.target!r}: neither a number nor one of the variants {names}")
    out = args.out or Path("runs") / f"strategies-{args.job.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    common = ([f"task.data_dir={args.data_dir}"] if args.data_dir else []) + list(args.overrides)

    rows: list[Row] = []
    starts: list[float] = []
    for variant in variants:
        row, started = run_variant(args.job, common, variant, out / variant.name)
        rows.append(row)
        starts.append(started)
        print(f"{row.name}: " + (f"failed ({row.error}), logs in {out / row.name}" if row.error else
                                 f"rounds {row.rounds} final {row.final:.4f} best {row.best:.4f} "
                                 f"wall {row.wall_s:.0f}s"), flush=True)
    baseline = run_baseline(args.job, common, out / "baseline") if args.baseline else None
    if args.target is not None and target_value is None:
        reference = rows[names.index(args.target)]
        target_value = reference.final  # None if that variant failed: no target column then
    if target_value is not None:
        for row, started, variant in zip(rows, starts, variants, strict=True):
            if row.error is None:
                row.to_target_s = seconds_to(out / variant.name, started, target_value)
    text = table(rows, baseline, target_value)
    print(text)
    print(f"runs in {out}")
    if args.table_out:
        args.table_out.parent.mkdir(parents=True, exist_ok=True)
        args.table_out.write_text(text + "\n", encoding="utf-8")
    return 1 if any(r.error for r in rows) or (baseline is not None and baseline.error) else 0


if __name__ == "__main__":
    raise SystemExit(main())
