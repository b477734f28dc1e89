"""Benchmarks: lb against HAProxy on this machine (see bench/README.md)."""
