"""Latency and accuracy-parity benchmarks against the PyTorch reference."""
