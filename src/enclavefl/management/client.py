"""A small client of the management API, for the CLI and for scripts: HTTPS with the job's CA and token.

It uses the standard library only (``http.client`` and ``ssl``), verifies the
server against the run's CA file, and sends the token as a bearer token.
:meth:`ManagementClient.for_run` reads the URL, CA and token from a run
directory; :meth:`ManagementClient.for_url` takes them from the caller.
"""

from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path
from typing import Any, Final, final
from urllib.parse import urlsplit

from enclavefl.errors import ConfigError, DeadlineExceeded, EnclaveFLError, Unavailable
from enclavefl.management.auth import read_token
from enclavefl.management.runfiles import read_management_info

__all__ = ["ManagementClient", "ManagementError"]

_TIMEOUT_S: Final = 10.0


class ManagementError(EnclaveFLError):
    """The management API answered with an error (the status and its message are kept)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@final
class ManagementClient:
    """Calls one job's management API."""

    def __init__(self, url: str, *, token: str | None, ca_file: Path | None, timeout_s: float = _TIMEOUT_S) -> None:
        """Targets ``url`` (``https://host:port``).

        Args:
            token: the job's token (None: only public read routes will answer).
            ca_file: the CA to verify the server against (None: the system's trust store).

        Raises:
            ConfigError: the URL is not https://host:port, or the CA file is unreadable.
        """
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(f"management URL {url!r}: expected https://HOST:PORT")
        self.url = url.rstrip("/")
        self._host = parts.hostname
        self._port = parts.port or 443
        self._token = token
        self._timeout_s = timeout_s
        try:
            self._context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{ca_file}: cannot load the management CA: {exc}") from exc

    @classmethod
    def for_run(cls, run_dir: Path, *, timeout_s: float = _TIMEOUT_S) -> ManagementClient:
        """The client of the job running in ``run_dir`` (its ``management.json`` and token file).

        Raises:
            ConfigError: no management API runs there, or its files are unreadable.
        """
        info = read_management_info(run_dir)
        return cls(info.url, token=read_token(info.token_file), ca_file=info.ca, timeout_s=timeout_s)

    @classmethod
    def for_url(cls, url: str, *, token_file: Path | None, ca_file: Path | None,
                timeout_s: float = _TIMEOUT_S) -> ManagementClient:
        """The client of the API at ``url``, with the token and CA from files.

        Raises:
            ConfigError: a file is unreadable or the URL malformed.
        """
        token = read_token(token_file) if token_file is not None else None
        return cls(url, token=token, ca_file=ca_file, timeout_s=timeout_s)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Sends one request and returns its decoded JSON answer.

        Raises:
            ManagementError: the API answered with an error status.
            Unavailable: the API cannot be reached, or TLS verification failed.
            DeadlineExceeded: no answer within the timeout.
        """
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        conn = http.client.HTTPSConnection(self._host, self._port, context=self._context, timeout=self._timeout_s)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except TimeoutError as exc:
            raise DeadlineExceeded(f"{method} {self.url}{path}: no answer within {self._timeout_s:g}s") from exc
        except ssl.SSLCertVerificationError as exc:
            raise Unavailable(f"{self.url}: the server's certificate does not verify against the CA: "
                              f"{exc.verify_message or exc}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise Unavailable(f"{self.url}: cannot reach the management API: {exc}") from exc
        finally:
            conn.close()
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = raw.decode(errors="replace")
        if response.status >= 400:
            message = decoded.get("detail") or decoded.get("error_message") if isinstance(decoded, dict) else decoded
            raise ManagementError(response.status, str(message or response.reason))
        return decoded

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body)
