"""Generated stubs of jest_stream/v1/scorer.proto (regenerate with protos/generate.py)."""
