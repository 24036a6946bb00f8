"""Deployment mistakes show up at once, as one line and the documented exit code: real processes on 127.0.0.1.

Exit codes: 2 configuration (another CA, differing job files, a missing extra),
4 network (a port in use, a PS that never answers).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from enclavefl.transport.certs import create_job_certs
from tests.integration.cluster import Cluster, free_port, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _enclavefl(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "enclavefl", *args], capture_output=True, text=True, timeout=timeout_s,
                          env=env, stdin=subprocess.DEVNULL)


def _one_line(stderr: str) -> str:
    """The single line a failing command prints (logs go to files in these tests)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _worker(c: Cluster, port: int, *extra: str, tls_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    return _enclavefl("worker", "--config", str(c.root / "job.yaml"), "--tls-dir", str(tls_dir or c.root / "certs"),
                      "--connect", f"127.0.0.1:{port}", "--index", "0", "--log-file", str(c.root / "logs" / "bad.log"),
                      *extra)


def test_a_worker_with_another_ca_exits_2_and_the_ps_logs_it(make_cluster: type[Cluster]) -> None:
    c = make_cluster.create()
    create_job_certs(c.root / "other-certs", "another-job", workers=3)
    port = free_port()
    c.start_ps(port)

    done = _worker(c, port, tls_dir=c.root / "other-certs")

    assert done.returncode == 2, done.stderr
    assert "the PS certificate failed verification" in _one_line(done.stderr)
    wait_for(lambda: c.log_has("ps", r"1 incoming connection\(s\) failed the TLS handshake"), 30,
             "the PS to log the failed handshake")
    assert c.log_has("ps", "this PS trusts the CA 'enclavefl CA for itest'")


def test_a_worker_with_another_job_file_is_refused_at_join_naming_the_keys(make_cluster: type[Cluster]) -> None:
    c = make_cluster.create()
    port = free_port()
    c.start_ps(port)

    done = _worker(c, port, "--set", "task.params.hidden=[32]", "--set", "job.seed=9")

    assert done.returncode == 2, done.stderr
    assert "job settings differ from the PS's in job.seed, model, task.params" in _one_line(done.stderr)
    assert c.log_has("ps", r"refused join from .*job settings differ")
    assert not c.log_has("ps", "joined")


def test_a_port_in_use_exits_4_with_one_line(make_cluster: type[Cluster]) -> None:
    c = make_cluster.create()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        done = _enclavefl("ps", "--config", str(c.root / "job.yaml"), "--tls-dir", str(c.root / "certs"),
                          "--out", str(c.root / "run"), "--set", f"transport.listen=127.0.0.1:{port}")

    assert done.returncode == 4, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in _one_line(done.stderr)


def test_a_worker_gives_up_on_an_absent_ps_after_its_connect_timeout(make_cluster: type[Cluster]) -> None:
    c = make_cluster.create()
    started = time.monotonic()

    done = _worker(c, free_port(), "--connect-timeout", "3")

    assert done.returncode == 4, done.stderr
    assert time.monotonic() - started < 60
    line = _one_line(done.stderr)
    assert "PS unreachable for 3s" in line and "(--connect-timeout 3s)" in line


BLOCKER = """
import sys


class _NotInstalled:
    # As if these packages were not installed: the import system raises what it raises for a missing module.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


def _without(tmp_path: Path, *modules: str) -> dict[str, str]:
    """An environment whose Python cannot import ``modules``."""
    folder = tmp_path / "blocker"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(modules)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))


def test_run_without_torch_names_the_ml_extra(tmp_path: Path) -> None:
    done = _enclavefl("run", str(REPO / "examples" / "digits" / "job.yaml"), "--out", str(tmp_path / "run"),
                      env=_without(tmp_path, "torch"))

    assert done.returncode == 2, done.stderr
    assert "pip install 'enclavefl[ml]'" in _one_line(done.stderr)


def test_worker_without_torch_names_the_ml_extra(make_cluster: type[Cluster], tmp_path: Path) -> None:
    c = make_cluster.create()

    done = _enclavefl("worker", "--config", str(c.root / "job.yaml"), "--tls-dir", str(c.root / "certs"),
                      "--connect", f"127.0.0.1:{free_port()}", "--index", "0", "--log-file", str(tmp_path / "w.log"),
                      env=_without(tmp_path, "torch"))

    assert done.returncode == 2, done.stderr
    assert "this needs torch, which is not installed: pip install 'enclavefl[ml]'" in _one_line(done.stderr)


def test_report_without_matplotlib_names_the_report_extra(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"round": r, "eval_accuracy": 0.5 + r / 10, "bytes_in": 10, "bytes_out": 10} for r in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    done = _enclavefl("report", str(run), env=_without(tmp_path, "matplotlib"))

    assert done.returncode == 2, done.stderr
    assert "pip install 'enclavefl[report]'" in _one_line(done.stderr)
