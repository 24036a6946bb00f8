"""The README's three-host recipe, run as written on 127.0.0.1: its commands are read from the README."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.cluster import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SECTION = "### Three hosts"
# What the README tells a reader trying the recipe on one machine to replace, and with what.
HOST, PORT = "ps.example.org", "7443"


def _section(readme: str) -> str:
    start = readme.index(SECTION)
    end = readme.find("\n## ", start)
    return readme[start : end if end != -1 else None]


def recipe_commands(readme: str) -> list[list[str]]:
    """The commands of the section's first fenced block, in order (comments and blank lines left out)."""
    block = re.search(r"```sh\n(.*?)```", _section(readme), re.S)
    assert block is not None, f"no ```sh block under {SECTION}"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_the_readme_says_how_to_run_the_recipe_on_one_machine() -> None:
    text = " ".join(_section((REPO / "README.md").read_text()).split())

    assert f"with `{HOST}` replaced by `127.0.0.1` (and `{PORT}` by a free port if it is taken)" in text


def test_the_three_host_recipe_finishes_the_job(tmp_path: Path) -> None:
    commands = recipe_commands((REPO / "README.md").read_text())
    assert [c[:2] for c in commands] == [["enclavefl", "certs"], ["enclavefl", "ps"], ["enclavefl", "worker"],
                                         ["enclavefl", "worker"]]
    (tmp_path / "examples").symlink_to(REPO / "examples")  # the recipe runs from a checkout's top folder
    port = str(free_port())
    started: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    try:
        for i, command in enumerate(commands):
            argv = [sys.executable, "-m", "enclavefl"] + [a.replace(HOST, "127.0.0.1").replace(PORT, port)
                                                         for a in command[1:]]
            console = tmp_path / f"console-{i}-{command[1]}.txt"
            with console.open("wb") as out:
                proc = subprocess.Popen(argv, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
            if command[1] == "certs":  # the set-up finishes before anything starts
                assert proc.wait(60) == 0, console.read_text()
            else:  # a long-running role, as on its own host
                started.append((command[1], proc, console))
        deadline = time.monotonic() + 300
        for name, proc, console in started:
            code = proc.wait(max(deadline - time.monotonic(), 1))
            assert code == 0, f"{name}: {console.read_text()}"
    finally:
        for _, proc, _ in started:
            proc.kill()
            proc.wait(10)

    run = tmp_path / "run"
    job = yaml.safe_load((REPO / "examples" / "digits" / "three_hosts.yaml").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, job["job"]["rounds"] + 1))
    assert all(r["participants"] == 2 for r in rows)
    # The PS kept its run directory and showed the summary, as `enclavefl run` does.
    assert yaml.safe_load((run / "config.yaml").read_text())["job"]["name"] == job["job"]["name"]
    assert "job digits-3hosts finished" in (run / "logs" / "ps.log").read_text()
    ps_console = next(c for name, _, c in started if name == "ps").read_text()
    assert "enclavefl ps summary" in ps_console and "run directory: run" in ps_console
    assert (tmp_path / "certs-ca" / "ca.key").stat().st_mode & 0o077 == 0


def test_a_site_added_later_joins_with_a_certificate_from_the_kept_ca(tmp_path: Path) -> None:
    job = str(REPO / "examples" / "digits" / "three_hosts.yaml")
    one_round = ["--set", "job.rounds=1", "--set", "round.min_workers=1"]
    python = [sys.executable, "-m", "enclavefl"]

    for setup in (["certs", "--out", "certs", "--workers", "2"],
                  ["certs", "add-worker", "--ca-dir", "certs-ca", "--out", "certs", "--index", "2"]):
        done = subprocess.run(python + setup, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    port = str(free_port())
    with (tmp_path / "ps.txt").open("wb") as ps_out, (tmp_path / "worker.txt").open("wb") as worker_out:
        ps = subprocess.Popen(python + ["ps", "--config", job, "--tls-dir", "certs", "--out", "run", "--quiet",
                                        "--set", f"transport.listen=127.0.0.1:{port}", *one_round],
                              cwd=tmp_path, stdout=ps_out, stderr=subprocess.STDOUT)
        worker = subprocess.Popen(python + ["worker", "--config", job, "--tls-dir", "certs", "--connect",
                                            f"127.0.0.1:{port}", "--index", "2", "--of", "3", *one_round],
                                  cwd=tmp_path, stdout=worker_out, stderr=subprocess.STDOUT)
    try:
        assert worker.wait(240) == 0, (tmp_path / "worker.txt").read_text()
        assert ps.wait(60) == 0, (tmp_path / "ps.txt").read_text()
    finally:
        for proc in (ps, worker):
            proc.kill()
            proc.wait(10)
    assert "(worker-2, enclavefl worker-2) joined" in (tmp_path / "run" / "logs" / "ps.log").read_text()
