"""Benchmarks for mics (see `mics bench`)."""
