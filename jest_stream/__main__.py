"""``python -m jest_stream``: the same as the ``jest-stream`` command."""
import sys

from jest_stream.cli import main

sys.exit(main())
