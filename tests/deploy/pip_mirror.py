"""The host's pip index for ``docker build`` on a machine that reaches only its package
mirrors: a pip.conf and the CA bundle, passed as build secrets (kept in no layer), with
the host's local index folders served on a loopback port of our own."""
from __future__ import annotations

import functools
import http.server
import logging
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)


def _pip_settings() -> dict[str, str]:
    """The host's pip settings (files, then $PIP_* over them, as pip reads them)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            timeout=60).stdout
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in listed.splitlines():
        m = re.match(r"^(:env:|[\w-]+)\.([\w-]+)='(.*)'$", line.strip())
        if m:
            (env if m.group(1) == ":env:" else files)[m.group(2)] = m.group(3)
    return {**files, **env}


class _LocalIndexHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the file system's absolute paths, only under ``allowed`` (a local simple
    index links its files relative to itself, e.g. ../../files/NAME, so its parent goes)."""

    allowed: tuple[str, ...] = ()

    def translate_path(self, path: str) -> str:
        local = os.path.realpath(super().translate_path(path))
        if any(local == root or local.startswith(root + os.sep) for root in self.allowed):
            return local
        return "/nonexistent"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base's signature
        log.debug("pip mirror: " + format, *args)


@dataclass
class PipMirror:
    """The host's pip index for ``docker build``: local folders (file:// indexes, find-links)
    served on a loopback port of our own (the build runs on the host's network), the rest
    as the host has it; the result is a pip.conf and the CA bundle, passed as build secrets."""

    folder: Path
    secrets: dict[str, Path] = field(default_factory=dict)
    base: str = ""  # http://127.0.0.1:PORT of the local folders
    _server: http.server.ThreadingHTTPServer | None = None

    def __enter__(self) -> PipMirror:
        settings = _pip_settings()
        allowed: list[str] = []
        handler = type("Handler", (_LocalIndexHandler,), {"allowed": ()})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory="/"))
        base = self.base = f"http://127.0.0.1:{self._server.server_address[1]}"

        def local(url: str) -> str:
            path = urlparse(url).path if url.startswith("file:") else url
            if not path.startswith("/"):
                return url
            real = os.path.realpath(path)
            allowed.append(os.path.dirname(real) if os.path.basename(real) == "simple" else real)
            return f"{base}{real}/"

        lines = ["[global]"]
        for key in ("index-url", "extra-index-url", "find-links"):
            if settings.get(key):
                lines.append(f"{key} = {' '.join(local(u) for u in settings[key].split())}")
        handler.allowed = tuple(allowed)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        cert = Path(settings.get("cert") or "/etc/ssl/certs/ca-certificates.crt")
        if cert.is_file():
            self.secrets["ca.crt"] = cert
            lines.append("cert = /run/secrets/ca.crt")
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "pip.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.secrets["pip.conf"] = conf
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
