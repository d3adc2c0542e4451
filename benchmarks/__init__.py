"""Latency and throughput benchmarks of the crisis classifier: research path, in-process ONNX
Runtime and the Triton ensemble (HTTP and gRPC), side by side in one run. CLI: benchmark.py."""
