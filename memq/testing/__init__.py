"""Test rigs that start real services for memq's tests and benchmarks."""
