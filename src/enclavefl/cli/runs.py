"""What ``enclavefl run``, ``simulate`` and ``ps`` share: the run directory and the round-by-round view.

The commands write the same run directory (``config.yaml``, ``metrics.jsonl``,
``checkpoints/``, ``logs/``) and show a job the same way: a progress bar over
the rounds, one line per completed round, and a summary table at the end.

``config.yaml`` is the resolved configuration the run started with, and
``--resume`` reads it back instead of the job file, so that forgetting a
``--set`` cannot silently change a job half-way. Only the keys in
:data:`RESUMABLE_KEYS` may change on resume (how long the job runs and how long
its rounds wait); they never change what a round computes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, final

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from enclavefl.config import JobConfig, load_job, override_key, parse_job
from enclavefl.errors import ConfigError, EnclaveFLError
from enclavefl.server.checkpoint import latest_checkpoint

__all__ = [
    "RESUMABLE_KEYS",
    "ResumePlan",
    "RoundProgress",
    "choose_run_dir",
    "claim_run_dir",
    "fmt",
    "plan_resume",
    "print_summary",
    "record_config",
    "round_line",
    "write_config",
]

CONFIG_FILE = "config.yaml"

RESUMABLE_KEYS = ("job.rounds", "round.start_window_s", "round.update_window_s", "round.max_retries",
                  "round.heartbeat_s", "round.worker_timeout_s", "transport.listen", "management.enabled",
                  "management.listen", "management.public_read", "summary.tensorboard")
"""The keys ``--set`` may change when a run resumes: the number of rounds (to extend a job), the rounds' waiting
windows and retries, how often workers are heard and how long a silent one is waited for, the PS's address, and
how the job is watched (management API, TensorBoard). Every other key would change what the resumed job computes."""

_RUN_PATH_KEYS = ("policy", "sim_root", "collateral")
"""``attestation`` paths, relative to the job file; a recorded config.yaml holds them absolute."""


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
    """Writes the resolved configuration the run uses (``--resume`` and ``enclavefl predict`` read it back)."""
    path = run_dir / CONFIG_FILE
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path


def record_config(run_dir: Path, config: JobConfig, job_file: Path) -> Path:
    """Writes ``config.yaml`` for a PS started from ``job_file``, so that ``--resume`` can read it back.

    Attestation paths (relative to the job file) and TLS paths (relative to the
    working directory) are written absolute. Nothing
    is written when ``job_file`` is that very file (``enclavefl run`` wrote it).

    Returns:
        The path of the run's ``config.yaml``.

    Raises:
        ConfigError: ``run_dir`` already holds a different ``config.yaml`` (another run: it is not replaced).
    """
    path = run_dir / CONFIG_FILE
    if path.exists() and job_file.exists() and path.samefile(job_file):
        return path
    doc = config.to_dict()
    for key in _RUN_PATH_KEYS:
        value = doc["attestation"].get(key)
        if value and not Path(value).is_absolute():
            doc["attestation"][key] = str((job_file.parent / value).resolve())
    for key in ("ca_cert", "cert", "key"):  # TLS files are relative to the working directory
        value = doc["transport"]["tls"].get(key)
        if value and not Path(value).is_absolute():
            doc["transport"]["tls"][key] = str(Path(value).resolve())
    resolved = parse_job(doc, source=str(job_file))
    if path.is_file():
        if load_job(path) == resolved:
            return path
        raise ConfigError(f"{path} holds the configuration of another run; continue that run with --resume, "
                          "or choose another --out for a new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_config(run_dir, resolved)


@dataclass(frozen=True, slots=True)
class ResumePlan:
    """What a resumed run will do: its configuration, what ``--set`` changed, and where it starts."""

    config: JobConfig
    """The run's ``config.yaml`` with the allowed ``--set`` overrides applied."""
    changes: tuple[tuple[str, Any, Any], ...]
    """(dotted key, value in ``config.yaml``, new value) for every key the overrides changed."""
    checkpoint_round: int | None
    """The round of the newest checkpoint, or None: the run starts again at round 1."""
    checkpoint_path: Path | None


def _leaves(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, Mapping):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _changes(before: JobConfig, after: JobConfig) -> tuple[tuple[str, Any, Any], ...]:
    old, new = _leaves(before.to_dict()), _leaves(after.to_dict())
    return tuple((k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k))


def _setter(key: str, overrides: Sequence[str]) -> str | None:
    """The last ``--set`` item that set ``key`` (or the section holding it)."""
    for item in reversed(overrides):
        set_key = override_key(item)
        if key == set_key or key.startswith(set_key + "."):
            return item
    return None


def plan_resume(run_dir: Path, overrides: Sequence[str], *, allow_start: bool = False) -> ResumePlan:
    """Reads a run directory back for ``--resume``: its ``config.yaml``, the allowed overrides, its newest checkpoint.

    Args:
        overrides: ``--set`` items; each may change only a key of :data:`RESUMABLE_KEYS`
            (one that sets a key to the value it has already is accepted).
        allow_start: ``--resume-or-start``: without a checkpoint the run starts again at round 1.

    Raises:
        ConfigError: ``config.yaml`` is missing or invalid, an override changes a key that must not
            change, there is no checkpoint (unless ``allow_start``), or the checkpoint is of the
            last round already.
        CheckpointError: the newest checkpoint is corrupt.
    """
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"--resume: {run_dir} holds no earlier run ({CONFIG_FILE} missing: a run writes the "
                          "resolved configuration there when it starts)")
    before = load_job(path)
    config = load_job(path, overrides)
    changes = _changes(before, config)
    refused = [key for key, _, _ in changes if key not in RESUMABLE_KEYS]
    if refused:
        key = refused[0]
        item = _setter(key, overrides)
        old = dict((k, v) for k, v, _ in changes)[key]
        raise ConfigError(f"{'--set ' + item if item else '--resume'}: {key} cannot change when a run resumes "
                          f"({path} has {old!r}); only {', '.join(RESUMABLE_KEYS)} may")
    checkpoint = latest_checkpoint(run_dir / config.server.checkpoint_dir)
    if checkpoint is None:
        if not allow_start:
            raise ConfigError(f"--resume: {run_dir / config.server.checkpoint_dir} holds no checkpoint, so there is "
                              "nothing to resume; use --resume-or-start to start the run again at round 1")
        return ResumePlan(config, changes, None, None)
    if checkpoint.round >= config.job.rounds:
        raise ConfigError(f"--resume: the run has completed all its rounds (checkpoint of round {checkpoint.round}, "
                          f"job.rounds = {config.job.rounds}); extend it with --set job.rounds=N, "
                          f"N > {checkpoint.round}")
    return ResumePlan(config, changes, checkpoint.round, checkpoint.path)


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
