"""Benchmark: a reference workload federated vs centralized, with the same budget.

Runs ``enclavefl run`` on an example job (real PS and worker processes), then
``enclavefl baseline`` on the same job into the same run directory, then
``enclavefl report``, and prints one final line: test accuracy (or AUC) of
both, the gap, the bytes the PS received against their dense cost, and wall time.

    python bench/workloads.py examples/recommendation/criteo.yaml --data-dir ../shared/data/criteo
    python bench/workloads.py examples/mnist/iid.yaml --data-dir ../shared/data/mnist --set job.rounds=10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _score(rows: list[dict[str, Any]]) -> tuple[str, float, float]:
    key = "eval_auc" if any(r.get("eval_auc") is not None for r in rows) else "eval_accuracy"
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return key.removeprefix("eval_"), values[-1], max(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", type=Path, help="example job YAML")
    parser.add_argument("--data-dir", required=True, help="task.data_dir for this run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", type=Path, help="run directory (default runs/bench-<job>-<time>)")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    out = args.out or Path("runs") / f"bench-{args.job.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    sets: list[str] = []
    for item in [f"task.data_dir={args.data_dir}", *args.overrides]:
        sets += ["--set", item]
    cli = [sys.executable, "-m", "enclavefl"]
    t0 = time.monotonic()
    subprocess.run([*cli, "run", str(args.job), "--out", str(out), "--quiet", *sets], check=True)
    fed_wall = time.monotonic() - t0
    fed = _rows(out / "metrics.jsonl")
    metric, fed_final, fed_best = _score(fed)
    line = (f"{args.job.stem}: rounds {len(fed)} federated {metric} final {fed_final:.4f} best {fed_best:.4f} "
            f"wall {fed_wall:.0f}s")
    if not args.skip_baseline:
        t1 = time.monotonic()
        # One thread, like each worker of `enclavefl run`: oversubscribed cores make small models crawl.
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        subprocess.run([*cli, "baseline", str(args.job), "--out", str(out), *sets], check=True, env=env)
        cen_wall = time.monotonic() - t1
        _, cen_final, cen_best = _score(_rows(out / "baseline.jsonl"))
        line += (f" | centralized final {cen_final:.4f} best {cen_best:.4f} wall {cen_wall:.0f}s"
                 f" | gap (central - federated) final {cen_final - fed_final:+.4f}")
    subprocess.run([*cli, "report", str(out)], check=True, stdout=subprocess.DEVNULL)
    bytes_in = sum(int(r["bytes_in"]) for r in fed)
    dense = sum(int(r.get("bytes_in_dense") or 0) for r in fed)
    if dense > bytes_in:  # only workloads with sparse uploads
        line += f" | uploads {bytes_in / 1e6:.1f} MB vs dense {dense / 1e6:.1f} MB ({dense / max(bytes_in, 1):.1f}x smaller)"
    print(line + f" | {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
