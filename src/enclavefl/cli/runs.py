"""What ``enclavefl run`` and ``enclavefl simulate`` share: the run directory and the round-by-round view.

Both commands write the same run directory (``config.yaml``, ``metrics.jsonl``,
``checkpoints/``, ``logs/``) and show a job the same way: a progress bar over
the rounds, one line per completed round, and a summary table at the end.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, final

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from enclavefl.config import JobConfig
from enclavefl.errors import EnclaveFLError

__all__ = ["RoundProgress", "choose_run_dir", "claim_run_dir", "fmt", "print_summary", "round_line", "write_config"]

CONFIG_FILE = "config.yaml"


def choose_run_dir(config: JobConfig, out: Path | None) -> Path:
    """``out``, or ``runs/<job name>-<timestamp>`` when none was given."""
    if out is not None:
        return out
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.job.name}-{stamp}"


def claim_run_dir(run_dir: Path, *, resume: bool) -> None:
    """Checks ``run_dir`` suits the run, then makes it and its ``logs/``.

    Raises:
        EnclaveFLError: ``resume`` and no earlier run is there, or not ``resume`` and
            the directory holds something (a new run never mixes with an old one).
    """
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            raise EnclaveFLError(f"--resume: {run_dir} holds no earlier run ({CONFIG_FILE} missing)")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise EnclaveFLError(f"{run_dir} already exists and is not empty; choose another --out or use --resume")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)


def write_config(run_dir: Path, config: JobConfig) -> Path:
    """Writes the resolved configuration the run uses (``enclavefl predict`` reads it back)."""
    path = run_dir / CONFIG_FILE
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path


def fmt(value: Any, digits: int = 4) -> str:
    """A metric for the console: ``-`` when missing, floats to ``digits`` places."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def round_line(row: dict[str, Any], rounds: int) -> str:
    """One completed round as a console line, from its ``metrics.jsonl`` row.

    The round's time is its own (training and aggregation); time spent waiting
    for workers to join before it opened (start-up, for the first round) is
    shown apart, as are dropped workers and rejected updates.
    """
    seconds = row["seconds_train"] + row["seconds_aggregate"]
    line = (f"round {row['round']:>3}/{rounds}  workers {row['participants']:>2}  "
            f"loss {fmt(row.get('train_loss'), 3)}  eval_loss {fmt(row.get('eval_loss'), 3)}  "
            f"eval_acc {fmt(row.get('eval_accuracy'), 3)}  {seconds:.1f}s")
    if row["seconds_wait"] >= 0.5:
        line += f" (+{row['seconds_wait']:.1f}s waiting for workers)"
    if row.get("dropped"):
        line += f"  dropped {row['dropped']}"
    if row.get("rejected"):
        line += f"  rejected {row['rejected']}"
    return line


@final
class RoundProgress:
    """A progress bar over the job's rounds that prints one line per completed round.

    Use it as a context manager (the bar shows between enter and exit) and hand
    it each metrics row with :meth:`add`; :attr:`rows` keeps the latest row of
    every round.
    """

    def __init__(self, console: Console, rounds: int, *, quiet: bool) -> None:
        """Prepares the bar; nothing shows until the context is entered.

        Args:
            quiet: no bar and no round lines (the rows are still kept).
        """
        self._rounds = rounds
        self._quiet = quiet
        self._progress = Progress(TextColumn("rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=console, disable=quiet, transient=True)
        self._bar = self._progress.add_task("rounds", total=rounds)
        self.rows: list[dict[str, Any]] = []

    def __enter__(self) -> RoundProgress:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def add(self, row: dict[str, Any]) -> None:
        """Records a completed round's row and prints its line."""
        # A resumed run repeats the rounds after its checkpoint: a round's later row replaces the rows from there on.
        self.rows = [r for r in self.rows if r["round"] < row["round"]] + [row]
        if not self._quiet:
            self._progress.console.print(round_line(row, self._rounds))
        self._progress.update(self._bar, completed=row["round"])


def print_summary(console: Console, rows: list[dict[str, Any]], wall_s: float, *, title: str) -> None:
    """The table at the end of a run: rounds, final and best score, final loss, traffic, wall time."""
    # Click models are judged by AUC: show it when the rows carry one.
    metric = "auc" if any(r.get("eval_auc") is not None for r in rows) else "acc"
    key = "eval_auc" if metric == "auc" else "eval_accuracy"
    table = Table(title=title)
    for col in ("rounds", f"final {metric}", f"best {metric}", "final loss", "MB in", "MB out", "wall s"):
        table.add_column(col, justify="right")
    scores = [r[key] for r in rows if r.get(key) is not None]
    last = rows[-1] if rows else {}
    table.add_row(
        str(len(rows)),
        fmt(last.get(key)),
        fmt(max(scores) if scores else None),
        fmt(last.get("eval_loss")),
        f"{sum(r.get('bytes_in', 0) for r in rows) / 1e6:.1f}",
        f"{sum(r.get('bytes_out', 0) for r in rows) / 1e6:.1f}",
        f"{wall_s:.1f}",
    )
    console.print(table)
