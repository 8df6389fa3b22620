"""Benchmarks: the decode kernel against SDPA, end-to-end decode tokens/s, onnxruntime step latency."""
