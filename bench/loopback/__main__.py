"""`python -m bench.loopback --config examples/simulated.toml --port 8900`."""

from bench.loopback.server import main

main()
