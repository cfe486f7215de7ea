"""Benchmarks of ccmr_jax against the tools a user would pick instead; see BENCHMARKS.md."""

import ccmr_jax  # noqa: F401  first, before numpy starts threads: its host-memory setting (ccmr_jax/host_memory.py)
