"""Strings a client sends (job ids, dataset names, keys): checked where they enter, and
shown in logs and error messages only escaped and bounded.

A job id or dataset name is at most ``MAX_NAME`` printable ASCII characters, so it can
neither flood a log or a metrics label nor forge a log line. A request that names no
dataset gets a namespace private to its job; that namespace starts with a NUL byte,
which no valid dataset name holds, so no client can name another job's namespace.
"""
from __future__ import annotations

from collections.abc import Sequence

MAX_NAME = 128
PRIVATE_PREFIX = "\0job:"
_SHOWN = 64  # characters of one client string shown in a log line or an error


def shown(value: object, limit: int = _SHOWN) -> str:
    """``value`` as a log or an error may show it: repr-escaped (no newline or control
    character gets through) and cut to ``limit`` characters, with the full length said."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}...({len(text)} chars)"


def shown_keys(keys: Sequence[str], total: int | None = None, few: int = 3) -> str:
    """A few keys, each escaped and bounded, then "and N more": well under 1 KiB."""
    total = len(keys) if total is None else total
    head = ", ".join(shown(k, 48) for k in keys[:few])
    more = total - min(few, len(keys))
    return f"[{head}]" + (f" and {more} more" if more > 0 else "")


def is_valid_name(value: str) -> bool:
    """True if ``value`` is at most MAX_NAME printable ASCII characters (empty allowed)."""
    return len(value) <= MAX_NAME and all(" " <= c <= "~" for c in value)


def check_name(value: str, field: str) -> str:
    """``value`` if it is a valid job id / dataset name, else ValueError naming ``field``."""
    if not is_valid_name(value):
        raise ValueError(f"{field}: {shown(value)} is not a valid name; use at most {MAX_NAME} "
                         "printable ASCII characters")
    return value


def namespace(dataset: str, job_id: str) -> str:
    """The cache namespace of a request: its dataset, or one private to its job if it names none."""
    return dataset if dataset else PRIVATE_PREFIX + job_id
