"""Loaded at interpreter start when this folder is on PYTHONPATH: makes the top-level
modules named in $JEST_TEST_BLOCK (comma-separated) impossible to import, as if their
extra were not installed."""
import os
import sys

_BLOCKED = {m for m in os.environ.get("JEST_TEST_BLOCK", "").split(",") if m}


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


if _BLOCKED:
    sys.meta_path.insert(0, _Blocker())
