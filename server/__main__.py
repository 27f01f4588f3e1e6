"""``python -m jest_stream.server``: the same as ``jest-stream serve``."""
import sys

from jest_stream.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
