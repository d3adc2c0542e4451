"""Latency and throughput benchmarks of every serving path, and load tests."""
