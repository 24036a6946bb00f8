"""Runs the fuzz targets for a bounded time each: ``python -m fuzz.run [--seconds N] [TARGET ...]``.

With atheris installed (the ``fuzz`` extra) each target runs coverage-guided in
its own process (libFuzzer stops it after ``--seconds``; a finding is written
next to the run's temporary corpus and named in the output). Without it,
hypothesis feeds each target seeds, mutated seeds and random bytes until its
time is up. Either way the exit code is 1 if any target let through something
other than a project error.

``--extra-seeds DIR`` adds every file under DIR (real quotes or certificates,
say) to every target's seeds; nothing is copied anywhere.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["inputs", "main", "mutate"]

MAX_INPUT_BYTES = 64 * 1024


def mutate(seed: bytes, edits: Sequence[tuple[int, int, bytes]]) -> bytes:
    """``seed`` with each edit applied: (0, pos, b) overwrites at pos, (1, pos, b) inserts, (2, pos, b) deletes len(b)."""
    data = bytearray(seed)
    for kind, pos, chunk in edits:
        at = pos % (len(data) + 1)
        if kind == 0:
            data[at : at + len(chunk)] = chunk
        elif kind == 1:
            data[at:at] = chunk
        else:
            del data[at : at + len(chunk)]
    return bytes(data[:MAX_INPUT_BYTES])


def inputs(seeds: Sequence[bytes]) -> Any:
    """A hypothesis strategy: a seed, a seed with a few edits, or random bytes."""
    from hypothesis import strategies as st

    edit = st.tuples(st.integers(0, 2), st.integers(0, 2**31), st.binary(min_size=1, max_size=16))
    mutated = st.builds(mutate, st.sampled_from(list(seeds)), st.lists(edit, min_size=1, max_size=6))
    return st.one_of(st.sampled_from(list(seeds)), mutated, mutated, st.binary(max_size=4096))


def _extra_seeds(directory: Path | None) -> list[bytes]:
    if directory is None:
        return []
    return [p.read_bytes()[:MAX_INPUT_BYTES] for p in sorted(directory.rglob("*")) if p.is_file()]


def _hypothesis(name: str, seconds: float, extra: list[bytes]) -> bool:
    from hypothesis import HealthCheck, given, settings

    from fuzz.targets import TARGETS, quiet_logs, run_one

    quiet_logs()
    target = TARGETS[name]
    seeds = target.seeds() + extra

    @settings(max_examples=200, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(inputs(seeds))
    def check(data: bytes) -> None:
        run_one(target, data)

    deadline = time.monotonic() + seconds
    batches = 0
    while time.monotonic() < deadline:
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - a finding, reported below
            print(f"{name}: FINDING {type(exc).__name__}: {exc}", flush=True)
            return False
        batches += 1
    print(f"{name}: ok ({batches} batches of up to 200 inputs in {seconds:.0f}s, hypothesis)", flush=True)
    return True


def _atheris_child(name: str, seconds: float, extra_dir: Path | None, work: Path) -> int:
    import atheris  # type: ignore[import-untyped]

    with atheris.instrument_imports(include=["enclavefl"]):
        from fuzz.targets import TARGETS, quiet_logs, run_one
    quiet_logs()
    target = TARGETS[name]
    corpus = work / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(target.seeds() + _extra_seeds(extra_dir)):
        (corpus / f"seed-{i}").write_bytes(seed)

    def one_input(data: bytes) -> None:
        run_one(target, data)

    atheris.Setup([sys.argv[0], f"-max_total_time={int(seconds)}", f"-max_len={MAX_INPUT_BYTES}",
                   "-rss_limit_mb=4096", f"-artifact_prefix={work}/", str(corpus)], one_input)
    atheris.Fuzz()
    return 0


def _atheris(name: str, seconds: float, extra_dir: Path | None) -> bool:
    work = Path(tempfile.mkdtemp(prefix=f"enclavefl-fuzz-{name}-"))
    command = [sys.executable, "-m", "fuzz.run", "--atheris-child", name, "--seconds", str(seconds),
               "--workdir", str(work)]
    if extra_dir is not None:
        command += ["--extra-seeds", str(extra_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, check=False)
    if result.returncode == 0:
        shutil.rmtree(work, ignore_errors=True)
        print(f"{name}: ok ({seconds:.0f}s, atheris)", flush=True)
        return True
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    print(f"{name}: FINDING (atheris exit {result.returncode}; the input is kept in {work})\n{tail}", flush=True)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help="target names (default: all)")
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", "30")),
                        help="time per target (default: $FUZZ_SECONDS or 30)")
    parser.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    parser.add_argument("--extra-seeds", type=Path, default=None, help="a directory of extra seed files")
    parser.add_argument("--atheris-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.atheris_child:
        return _atheris_child(args.atheris_child, args.seconds, args.extra_seeds, args.workdir)

    from fuzz.targets import TARGETS

    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") is not None else "hypothesis"
    extra = _extra_seeds(args.extra_seeds)
    failed = []
    for name in names:
        ok = _atheris(name, args.seconds, args.extra_seeds) if engine == "atheris" else _hypothesis(name, args.seconds, extra)
        if not ok:
            failed.append(name)
    if failed:
        print(f"findings in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
