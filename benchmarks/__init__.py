"""Benchmarks: tierserve against bare vLLM and a LiteLLM proxy (`python -m benchmarks`, see README.md)."""
