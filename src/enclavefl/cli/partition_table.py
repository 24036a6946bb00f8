"""The partition summary `enclavefl run` prints at start: each worker's size and label histogram.

Computed in the parent from the task alone (the split is deterministic by
seed), so the table shows what every worker will hold before any starts.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from enclavefl.config import JobConfig
from enclavefl.training import Task

__all__ = ["print_partition_table"]

MAX_SHOWN_CLASSES = 10


def print_partition_table(console: Console, config: JobConfig, task: Task | None = None) -> None:
    """Prints one row per worker; tasks without ``partition_summary`` are skipped with a note.

    Args:
        task: the job's task if the caller has it already (default: loaded from ``config``).
    """
    from enclavefl.tasks import load_task

    task = task if task is not None else load_task(config)
    summarize = getattr(task, "partition_summary", None)
    if not callable(summarize):
        console.print(f"partition: task {config.task.name} does not describe its split")
        return
    rows = summarize(config.job.workers)
    table = Table(title=f"partition: {config.task.partition}, {config.job.workers} workers")
    table.add_column("worker", justify="right")
    table.add_column("samples", justify="right")
    table.add_column("classes", justify="right")
    table.add_column("label histogram")
    for row in rows:
        counts = [int(c) for c in row.histogram]
        shown = " ".join(str(c) for c in counts[:MAX_SHOWN_CLASSES])
        if len(counts) > MAX_SHOWN_CLASSES:
            shown += f" ... (+{len(counts) - MAX_SHOWN_CLASSES} classes)"
        table.add_row(str(row.worker), str(row.size), str(sum(1 for c in counts if c)), shown)
    console.print(table)
