"""``enclavefl export RUN_DIR --format safetensors|torch|onnx``: a run's model in a standard format.

The model is the run's newest checkpoint, or round N's with ``--round N`` while
that checkpoint is still on disk (a run keeps only its newest 3 checkpoints,
written every ``server.checkpoint_every`` rounds and at the last round). The job
comes from the run directory's ``config.yaml``, as the run resolved it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from enclavefl.config import JobConfig, load_job
from enclavefl.errors import CheckpointError, ConfigError, DataError
from enclavefl.server.checkpoint import Checkpoint, list_checkpoints, load_checkpoint

__all__ = ["add_parser", "checkpoint_rounds", "load_run_checkpoint", "run_export"]

_FORMATS = ("safetensors", "torch", "onnx")  # enclavefl.ml.export.FORMATS, without importing torch to parse argv
_KEPT = 3


def add_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="write a run's trained model as safetensors, torch or ONNX")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (config.yaml and checkpoints/)")
    p.add_argument("--format", required=True, choices=_FORMATS, dest="fmt",
                   help="safetensors, torch (torch.save of the state_dict) or onnx (needs the export extra)")
    p.add_argument("--round", type=int, help=f"export this round's checkpoint (default: the newest; a run keeps "
                                             f"its newest {_KEPT})")
    p.add_argument("--out", type=Path, help="output file (default RUN_DIR/model-round-NNNNNN.<format ending>)")
    p.set_defaults(func=run_export)


def checkpoint_rounds(directory: Path) -> dict[int, Path]:
    """The checkpoints in ``directory`` by round, oldest first (empty when there is none)."""
    return dict(list_checkpoints(directory))


def load_run_checkpoint(run_dir: Path, config: JobConfig, round_number: int | None) -> Checkpoint:
    """Round ``round_number``'s checkpoint of a run (the newest when None).

    Raises:
        ConfigError: the run has no checkpoint, or none of that round is on disk
            (names the rounds that are).
        DataError: the checkpoint is corrupt.
    """
    directory = run_dir / config.server.checkpoint_dir
    rounds = checkpoint_rounds(directory)
    if not rounds:
        raise ConfigError(f"{directory}: no checkpoint (round-NNNNNN.ckpt) to export")
    if round_number is None:
        round_number = max(rounds)
    if round_number not in rounds:
        raise ConfigError(
            f"--round {round_number}: no checkpoint of that round in {directory}; it holds rounds "
            f"{', '.join(map(str, rounds))} (a run keeps its newest {_KEPT} checkpoints, one every "
            f"server.checkpoint_every = {config.server.checkpoint_every} rounds)"
        )
    try:
        return load_checkpoint(rounds[round_number])
    except CheckpointError as exc:
        raise DataError(str(exc)) from exc


def run_export(args: argparse.Namespace) -> int:
    from enclavefl.ml.export import FORMATS, export_model

    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: not a run directory (expected a folder with config.yaml and checkpoints/)")
    if args.round is not None and args.round < 1:
        raise ConfigError(f"--round {args.round}: rounds are numbered from 1")
    config = load_job(run_dir / "config.yaml")
    ckpt = load_run_checkpoint(run_dir, config, args.round)
    out: Path = args.out or run_dir / f"model-round-{ckpt.round:06d}{FORMATS[args.fmt]}"
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give a file name")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")
    meta = export_model(config, ckpt, args.fmt, out)
    size = out.stat().st_size
    print(f"enclavefl export: job {config.job.name}, task {config.task.name}, round {ckpt.round} "
          f"(model version {ckpt.model_version}, digest {meta['params_digest'][:16]}), {len(ckpt.params)} tensors "
          f"-> {out} ({args.fmt}, {size / 1e6:.2f} MB)")
    return 0
