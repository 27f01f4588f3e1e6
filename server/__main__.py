"""``python -m jest_stream.server``: the same as ``jest-stream serve``."""
import sys

from jest_stream.server.cli import main

sys.exit(main())
