"""Benchmarks of the activator against raw CRIU, cold starts and direct traffic.

Run them all with `scripts/bench` (or `scripts/bench --quick`); see bench/README.md.
"""
