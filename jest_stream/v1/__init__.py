"""Generated stubs of protos/jest_stream/v1/scorer.proto (regenerate with protos/generate.py)."""
