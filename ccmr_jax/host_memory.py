"""Host memory: keep the buffers XLA:CPU frees, instead of handing them back to the kernel after every step.

XLA:CPU allocates each execution's temporary buffer (every intermediate of a
training step: 363 MiB for the ``small`` benchmark workload) with
``posix_memalign`` on one of its worker threads, and frees it when the step
ends. glibc serves a block that large from the thread's arena by a fresh
``mmap`` and returns it with ``munmap``, so every step faults in every page
of it again: on a 2-core Intel Xeon, 95,000 page faults and about 150 ms of
kernel time per ``small`` step (``BENCHMARKS.md``). :func:`keep_freed_memory`
makes glibc serve every thread from its one main heap, grown with ``brk``
and never trimmed, so the next step reuses pages already mapped.

The price: the process keeps its peak heap rather than returning freed
memory to the system (its resident size stays at its peak), and all threads
share one malloc arena. :func:`release_free_memory` hands the free part back
on demand: the experiment calls it between stages (after the zero-shot row,
after each task's training and after its evaluation), so what compilation
and evaluation freed does not stay resident for the rest of the run, at the
cost of one step's page faults when the next task starts training. Set
``CCMR_JAX_HOST_MALLOC=default`` to leave glibc's defaults alone. Nothing
happens where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"
ENV_VAR = "CCMR_JAX_HOST_MALLOC"


@functools.lru_cache(maxsize=1)
def _glibc():
  """The running glibc as a ctypes library, or None (another C library, or none found); looked up once."""
  name = ctypes.util.find_library("c")
  if not name:
    return None
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
    return libc if hasattr(libc, "mallopt") else None
  except (OSError, AttributeError):
    return None


def keep_freed_memory() -> bool:
  """One heap, no ``mmap`` for large blocks, and freed memory kept (see the module docstring).

  glibc fixes its arena limit when a second thread first allocates: call
  this before numpy's BLAS threads and JAX's CPU backend start (importing
  ``ccmr_jax`` first does).

  Returns:
    Whether glibc accepted the settings (False: not glibc, or switched off by
    ``CCMR_JAX_HOST_MALLOC=default``).
  """
  if os.environ.get(ENV_VAR, "").lower() == "default":
    return False
  libc = _glibc()
  if libc is None:
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
  return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


def release_free_memory() -> bool:
  """Returns the heap's free pages to the system (glibc's ``malloc_trim(0)``), whatever the trim setting.

  Returns:
    Whether glibc released any memory (False where the C library is not glibc).
  """
  libc = _glibc()
  return bool(libc.malloc_trim(0)) if libc is not None else False
