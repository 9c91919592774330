"""The `mics` command line."""
