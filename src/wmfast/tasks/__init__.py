"""Synthetic working-memory tasks (data generators for training and benchmarks)."""
