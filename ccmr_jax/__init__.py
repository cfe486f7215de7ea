"""ccmr_jax: continual cross-modal retrieval in JAX/Flax.

A dual encoder (image tower + text tower -> one embedding space) is trained on
a sequence of tasks; galleries are indexed with ScaNN under two indexing
policies (``reindex`` and ``no_reindex``) and queried with the current
encoders; the results are recall matrices, forgetting and backward transfer.
"""

from ccmr_jax import host_memory

__version__ = "0.1.0"
HOST_MALLOC_TUNED = host_memory.keep_freed_memory()  # before JAX's CPU threads exist: see ccmr_jax/host_memory.py
