from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from enclavefl.errors import ConfigError
from enclavefl.management.auth import TokenGuard, bearer_token, generate_token, read_token, write_token
from enclavefl.transport.audit import AuditLog


def test_generated_tokens_are_long_and_differ() -> None:
    a, b = generate_token(), generate_token()

    assert a != b
    assert len(a) >= 40  # 32 random bytes in URL-safe base64


def test_token_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "management.token"

    write_token(path, "secret")

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token(path) == "secret"


def test_writing_a_token_replaces_the_earlier_one(tmp_path: Path) -> None:
    path = tmp_path / "management.token"
    write_token(path, "first")

    write_token(path, "second")

    assert read_token(path) == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["management.token"]


def test_reading_a_missing_token_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.token"):
        read_token(tmp_path / "missing.token")


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer abc", "abc"),
    ("bearer   abc  ", "abc"),
    ("Basic abc", None),
    ("Bearer", None),
    ("", None),
    (None, None),
    ("Bearer " + "x" * 600, None),
])
def test_bearer_token_is_read_from_the_authorization_header(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_guard_accepts_only_this_jobs_token() -> None:
    guard = TokenGuard("job-token")

    assert guard.valid("Bearer job-token")
    assert not guard.valid("Bearer other-job-token")
    assert not guard.valid("Bearer job-token2")
    assert not guard.valid(None)


def test_public_read_opens_read_routes_but_never_control_routes() -> None:
    guard = TokenGuard("t", public_read=True)

    assert guard.allows(None, control=False)
    assert not guard.allows(None, control=True)
    assert guard.allows("Bearer t", control=True)


def test_without_public_read_read_routes_need_the_token() -> None:
    guard = TokenGuard("t")

    assert not guard.allows(None, control=False)
    assert guard.allows("Bearer t", control=False)


def test_a_refusal_is_audited_without_the_presented_token(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    guard = TokenGuard("t", audit=audit)

    reason = guard.refuse("10.0.0.1:5000", "POST /api/v1/stop", "Bearer guessed-secret")
    audit.close()
    guard.close()

    rows = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert rows[0]["decision"] == "refused" and rows[0]["field"] == "token"
    assert rows[0]["peer"] == "10.0.0.1:5000" and "POST /api/v1/stop" in rows[0]["reason"]
    assert "guessed-secret" not in json.dumps(rows) and "guessed-secret" not in reason
    assert guard.refusals == 1


def test_a_flood_of_refusals_writes_a_bounded_number_of_audit_lines(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    guard = TokenGuard("t", audit=audit)

    for _ in range(200):
        guard.refuse("10.0.0.1:5000", "POST /api/v1/stop", None)
    audit.close()
    guard.close()

    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert 1 <= len(lines) <= 10  # the per-caller bucket: a burst of 5, then 0.2 a second
    assert guard.refusals == 200


def test_an_empty_token_is_refused_as_a_guard() -> None:
    with pytest.raises(ValueError, match="empty"):
        TokenGuard("")
