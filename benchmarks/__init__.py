"""Benchmarks of ccmr_jax against the tools a user would pick instead; see BENCHMARKS.md."""
