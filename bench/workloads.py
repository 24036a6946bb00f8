"""Benchmark: a reference workload federated vs centralized, with the same budget.

Runs ``enclavefl run`` on an example job (real PS and worker processes), then
``enclavefl baseline`` on the same job into the same run directory, then
``enclavefl report``, and prints one final line: test accuracy (or AUC) of
both, the gap, the bytes the PS received against their dense cost, and wall time.

``--folds K`` (criteo-dlrm) repeats this K times, holding out a different
1/K of the distinct rows each time (``task.params.eval_fold``), and prints the
mean of each score and the mean gap with its standard error: on a small sample
one held-out slice is too few rows to tell two models apart.

    python bench/workloads.py examples/recommendation/criteo.yaml --data-dir ../shared/data/criteo --folds 10
    python bench/workloads.py examples/mnist/iid.yaml --data-dir ../shared/data/mnist --set job.rounds=10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Outcome:
    metric: str
    rounds: int
    fed_final: float
    fed_best: float
    fed_wall: float
    bytes_in: int
    bytes_dense: int
    bytes_out: int = 0
    bytes_out_dense: int = 0
    cen_final: float | None = None
    cen_best: float | None = None
    cen_wall: float | None = None


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _score(rows: list[dict[str, Any]]) -> tuple[str, float, float]:
    key = "eval_auc" if any(r.get("eval_auc") is not None for r in rows) else "eval_accuracy"
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return key.removeprefix("eval_"), values[-1], max(values)


def run_once(job: Path, sets: list[str], out: Path, baseline: bool) -> Outcome:
    """Federated run, centralized baseline and report into ``out``."""
    cli = [sys.executable, "-m", "enclavefl"]
    t0 = time.monotonic()
    subprocess.run([*cli, "run", str(job), "--out", str(out), "--quiet", *sets], check=True)
    fed = _rows(out / "metrics.jsonl")
    metric, fed_final, fed_best = _score(fed)
    outcome = Outcome(metric, len(fed), fed_final, fed_best, time.monotonic() - t0,
                      sum(int(r["bytes_in"]) for r in fed), sum(int(r.get("bytes_in_dense") or 0) for r in fed),
                      sum(int(r.get("bytes_out") or 0) for r in fed),
                      sum(int(r.get("bytes_out_dense") or r.get("bytes_out") or 0) for r in fed))
    if baseline:
        t1 = time.monotonic()
        # One thread, like each worker of `enclavefl run`: oversubscribed cores make small models crawl.
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        subprocess.run([*cli, "baseline", str(job), "--out", str(out), *sets], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        outcome.cen_wall = time.monotonic() - t1
        _, outcome.cen_final, outcome.cen_best = _score(_rows(out / "baseline.jsonl"))
    subprocess.run([*cli, "report", str(out)], check=True, stdout=subprocess.DEVNULL)
    return outcome


def describe(name: str, o: Outcome) -> str:
    line = (f"{name}: rounds {o.rounds} federated {o.metric} final {o.fed_final:.4f} best {o.fed_best:.4f} "
            f"wall {o.fed_wall:.0f}s")
    if o.cen_final is not None and o.cen_best is not None:
        line += (f" | centralized final {o.cen_final:.4f} best {o.cen_best:.4f} wall {o.cen_wall:.0f}s"
                 f" | gap (central - federated) final {o.cen_final - o.fed_final:+.4f}")
    if o.bytes_dense > o.bytes_in:  # only workloads with sparse uploads
        line += (f" | uploads {o.bytes_in / 1e6:.1f} MB vs dense {o.bytes_dense / 1e6:.1f} MB "
                 f"({o.bytes_dense / max(o.bytes_in, 1):.1f}x smaller)")
    if o.bytes_out_dense > o.bytes_out:  # sparse or quantized downloads
        line += (f" | downloads {o.bytes_out / 1e6:.1f} MB vs dense {o.bytes_out_dense / 1e6:.1f} MB "
                 f"({o.bytes_out_dense / max(o.bytes_out, 1):.1f}x smaller)")
    up_down, dense = o.bytes_in + o.bytes_out, max(o.bytes_dense, o.bytes_in) + o.bytes_out_dense
    if dense > up_down:
        line += f" | up + down {up_down / 1e6:.1f} MB vs dense {dense / 1e6:.1f} MB ({dense / max(up_down, 1):.1f}x smaller)"
    return line


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", type=Path, help="example job YAML")
    parser.add_argument("--data-dir", required=True, help="task.data_dir for this run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", type=Path, help="run directory (default runs/bench-<job>-<time>)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--folds", type=int, default=1,
                        help="cross-validate over K held-out slices (criteo-dlrm; sets eval_fraction=1/K)")
    args = parser.parse_args()
    if args.folds < 1:
        parser.error("--folds must be >= 1")
    out = args.out or Path("runs") / f"bench-{args.job.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    sets: list[str] = []
    for item in [f"task.data_dir={args.data_dir}", *args.overrides]:
        sets += ["--set", item]
    if args.folds == 1:
        print(describe(args.job.stem, run_once(args.job, sets, out, not args.skip_baseline)) + f" | {out}")
        return 0
    outcomes: list[Outcome] = []
    for fold in range(args.folds):
        fold_sets = sets + ["--set", f"task.params.eval_fraction={1 / args.folds!r}",
                            "--set", f"task.params.eval_fold={fold}"]
        outcomes.append(run_once(args.job, fold_sets, out / f"fold-{fold}", not args.skip_baseline))
        print(describe(f"fold {fold}", outcomes[-1]), flush=True)
    fed, fed_se = _mean_se([o.fed_final for o in outcomes])
    line = f"{args.job.stem}: {args.folds} folds, federated {outcomes[0].metric} final mean {fed:.4f} (se {fed_se:.4f})"
    if not args.skip_baseline:
        cen, cen_se = _mean_se([o.cen_final for o in outcomes if o.cen_final is not None])
        gap, gap_se = _mean_se([o.cen_final - o.fed_final for o in outcomes if o.cen_final is not None])
        line += f" | centralized {cen:.4f} (se {cen_se:.4f}) | gap (central - federated) {gap:+.4f} (se {gap_se:.4f})"
    bytes_in, dense = sum(o.bytes_in for o in outcomes), sum(o.bytes_dense for o in outcomes)
    if dense > bytes_in:
        line += f" | uploads {dense / max(bytes_in, 1):.1f}x smaller than dense"
    print(line + f" | {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
