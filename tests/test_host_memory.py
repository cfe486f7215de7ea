"""ccmr_jax.host_memory: freed large blocks stay mapped, so reusing them costs no page faults."""

import os
import subprocess
import sys

from ccmr_jax import host_memory

# Allocate and touch 100 MB, free it, allocate and touch 100 MB again: the page faults of the second touch.
_PROGRAM = """
import resource, ccmr_jax, numpy as np
a = np.empty(100_000_000, np.uint8); a.fill(1); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.empty(100_000_000, np.uint8); b.fill(2)
print(ccmr_jax.HOST_MALLOC_TUNED, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_touch(setting):
  env = dict(os.environ, **{host_memory.ENV_VAR: setting})
  out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True, check=True)
  tuned, faults = out.stdout.split()
  return tuned == "True", int(faults)


def test_reused_memory_is_not_faulted_in_again_unless_switched_off():
  tuned, tuned_faults = _second_touch("")
  default, default_faults = _second_touch("default")
  assert tuned and not default
  assert default_faults >= 20  # glibc's default: the block was unmapped and is mapped (and faulted) anew
  assert tuned_faults <= default_faults // 10


def test_settings_are_accepted_by_this_glibc():
  assert host_memory.keep_freed_memory()


# Allocate and touch 300 MB in small blocks (the heap, not mmap), free them: RSS before and after the release.
_RELEASE_PROGRAM = """
import ccmr_jax
from ccmr_jax import host_memory
def rss():
  return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) // 1024
blocks = [bytearray(b"x" * 100_000) for _ in range(3_000)]
del blocks
before = rss()
released = host_memory.release_free_memory()
print(released, before, rss())
"""


def test_free_heap_is_kept_until_released():
  out = subprocess.run([sys.executable, "-c", _RELEASE_PROGRAM], capture_output=True, text=True, check=True)
  released, before, after = out.stdout.split()
  assert released == "True"
  assert int(before) - int(after) >= 200  # MB: the 300 MB freed stayed resident (no trimming) until released
