"""``enclavefl report RUN_DIR...``: federated vs centralized, as a Markdown table and PNG plots.

Each run directory may hold ``metrics.jsonl`` (from ``enclavefl run``) and
``baseline.jsonl`` (from ``enclavefl baseline --out`` the same directory). The
score is AUC when the rows carry ``eval_auc`` (recommendation), else accuracy.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclavefl.errors import ConfigError
from enclavefl.ml.baseline import BASELINE_FILE

__all__ = ["Series", "add_parser", "read_series", "run_report", "write_report"]

METRICS_FILE = "metrics.jsonl"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="write report.md and plots comparing federated and centralized runs")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories")
    p.add_argument("--out", type=Path, help="where report.md and the PNGs go (default: the first RUN_DIR)")
    p.set_defaults(func=run_report)


@dataclass(frozen=True, slots=True)
class Series:
    """One training curve: score per round, plus what it cost."""

    label: str
    metric: str
    rounds: tuple[int, ...]
    scores: tuple[float, ...]
    wall_s: float
    bytes_moved: int | None
    bytes_dense: int | None

    @property
    def final(self) -> float | None:
        return self.scores[-1] if self.scores else None

    @property
    def best(self) -> float | None:
        return max(self.scores) if self.scores else None


def _rows(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{lineno}: not a JSON object ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise ConfigError(f"{path}:{lineno}: expected an object with an integer 'round'")
        rows.append(row)
    return rows


def read_series(path: Path, label: str) -> Series:
    """Reads a metrics.jsonl (federated) or baseline.jsonl (centralized) file.

    Raises:
        ConfigError: unreadable file or a malformed row (names file and line).
    """
    rows = _rows(path)
    metric = "eval_auc" if any(r.get("eval_auc") is not None for r in rows) else "eval_accuracy"
    scored = [r for r in rows if isinstance(r.get(metric), int | float)]
    federated = any("bytes_in" in r for r in rows)
    if federated:
        wall = sum(float(r.get(k) or 0.0) for r in rows for k in ("seconds_wait", "seconds_train", "seconds_aggregate", "seconds_eval"))
        moved: int | None = sum(int(r.get("bytes_in") or 0) + int(r.get("bytes_out") or 0) for r in rows)
        dense = (sum(int(r.get("bytes_in_dense") or 0) + int(r.get("bytes_out") or 0) for r in rows)
                 if all("bytes_in_dense" in r for r in rows) else None)
    else:
        wall = float(rows[-1].get("seconds_total") or 0.0) if rows else 0.0
        moved, dense = None, None
    return Series(label, metric.removeprefix("eval_"), tuple(int(r["round"]) for r in scored),
                  tuple(float(r[metric]) for r in scored), wall, moved, dense)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def _plot(series: list[Series], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in series:
        ax.plot(s.rounds, s.scores, marker="o", markersize=3, label=s.label)
    ax.set_xlabel("round (client.epochs epochs of the data each)")
    ax.set_ylabel(f"test {series[0].metric}")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(runs: list[Path], out: Path) -> Path:
    """Writes ``out/report.md`` (and one ``<run>.png`` per run directory); returns the report's path.

    Raises:
        ConfigError: a run directory holds neither metrics.jsonl nor baseline.jsonl.
    """
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# enclavefl report",
        "",
        "| run | training | metric | final | best | rounds | wall s | MB moved | MB if dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    plots: list[str] = []
    for run in runs:
        series: list[Series] = []
        if (run / METRICS_FILE).is_file():
            series.append(read_series(run / METRICS_FILE, "federated"))
        if (run / BASELINE_FILE).is_file():
            series.append(read_series(run / BASELINE_FILE, "centralized"))
        if not series:
            raise ConfigError(f"{run}: holds neither {METRICS_FILE} nor {BASELINE_FILE}")
        name = run.resolve().name
        for s in series:
            lines.append(f"| {name} | {s.label} | {s.metric} | {_fmt(s.final)} | {_fmt(s.best)} | {len(s.rounds)} | "
                         f"{s.wall_s:.1f} | {_mb(s.bytes_moved)} | {_mb(s.bytes_dense)} |")
        if any(s.scores for s in series):
            png = f"{name}.png"
            _plot([s for s in series if s.scores], name, out / png)
            plots.append(f"![{name}]({png})")
    lines += ["", "Wall time: federated sums the PS's per-round seconds; centralized is the baseline's total.",
              "MB moved: update bytes in plus model bytes out at the PS.", ""]
    lines += [p + "\n" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def run_report(args: argparse.Namespace) -> int:
    out = args.out or args.runs[0]
    path = write_report(list(args.runs), out)
    print(f"wrote {path}")
    return 0
