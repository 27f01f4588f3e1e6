"""Which ``pip install 'jest-stream[EXTRA]'`` brings a missing module: one message for
every import path and command, so a first contact without an extra gets one line that
names what to install instead of a traceback."""
from __future__ import annotations

import importlib
from types import ModuleType

# The extra a trainer-side or server-side module comes with.
MODULE_EXTRAS: dict[str, str] = {
    "torch": "client", "grpc": "client", "grpc_health": "client", "webdataset": "client",
    "threadpoolctl": "client", "onnxruntime": "server", "prometheus_client": "server",
    "grpc_reflection": "server", "uvloop": "server", "onnx": "local", "sklearn": "demo",
    "matplotlib": "demo",
}


def install_hint(missing: str | None, what: str, extra: str | None = None) -> str:
    """``"<what> needs <module>, which is not installed: pip install 'jest-stream[<extra>]'"``."""
    top = (missing or "?").split(".")[0]
    extra = extra or MODULE_EXTRAS.get(top, "dev")
    return f"{what} needs {top}, which is not installed: pip install 'jest-stream[{extra}]'"


def is_third_party(exc: ModuleNotFoundError) -> bool:
    """True when the missing module is not one of ours (a missing extra, not a bug)."""
    top = (exc.name or "").split(".")[0]
    return bool(top) and top != "jest_stream"


def require(module: str, what: str, extra: str | None = None) -> ModuleType:
    """``import module``, or a ModuleNotFoundError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if not is_third_party(exc):
            raise
        raise ModuleNotFoundError(install_hint(exc.name, what, extra), name=exc.name) from None
