"""Test setup: 8 fake CPU devices, so sharded code runs as on an 8-chip host.

The tests' own process keeps no persistent compilation cache. All its runs
are 8-device programs, and multi-device steps loaded from such a cache have
aborted inside XLA:CPU: in 2 of 6 runs of ``tests/test_integrity.py``, in
1 of 3 suites whose two xdist workers shared one cache, and in 1 of 2
suites with a cache per worker (README.md, "Known XLA:CPU hang"). Without
it, runs of the same config compile their programs again: about 25 s more
in two workers. Child runs on one device keep theirs (``test_resume``,
``test_workdir``, the benchmarks' smoke tests).

XLA compiles every program of the suite, in this process and in the runs
it starts (:func:`xla_flags`), at its cheapest LLVM optimisation level:
the optimised HLO is the same (checked on the tiny and default training
steps), only its machine code is less optimised, so results may differ from
a default build in rounding. Tests compare runs made under the same flags.
With the single import name below, it took a fifth off the suite's time
(BENCHMARKS.md). Import this module as ``conftest``, never as
``tests.conftest``: a second name would run it a second time.
"""

import ccmr_jax  # noqa: F401  first: its host-memory setting reaches every thread (ccmr_jax/host_memory.py)

import contextlib
import os

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
  """``XLA_FLAGS`` for a test's child process: the tests' compile flags on ``devices`` fake CPU devices."""
  return f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"


os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
# Runs skip their PNG figures (about 7 s each, some 40 % of the suite's time), in this process and in the runs it
# starts; the shared tiny run below draws them, and its tests check them.
os.environ["CCMR_JAX_PLOTS"] = "0"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ccmr_jax.data.examples import Examples  # noqa: E402


def pytest_collection_modifyitems(items):
  """Tests marked ``slow`` first, the rest in their order: two xdist workers start the long runs early, and the
  suite does not end on one of them while the other worker waits."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def devices():
  found = jax.devices()
  assert len(found) == 8, "tests expect 8 fake CPU devices (XLA_FLAGS set in conftest)"
  return found


def make_examples(labels, captions_per_image=2, image_size=8, seed=0):
  """Hand-made :class:`Examples` with the given labels per image."""
  rng = np.random.default_rng(seed)
  n = len(labels)
  captions = tuple(f"image {i} caption {j}" for i in range(n) for j in range(captions_per_image))
  return Examples(
      images=rng.integers(0, 255, size=(n, image_size, image_size, 3), dtype=np.uint8),
      image_ids=np.arange(n, dtype=np.int64),
      captions=captions,
      caption_image=np.repeat(np.arange(n), captions_per_image),
      labels=tuple(np.asarray(l, np.int32) for l in labels),
  )


def captioned_examples(captions_per_image):
  """:class:`Examples` of blank images with the given captions per image (no labels that matter)."""
  captions = tuple(c for caps in captions_per_image for c in caps)
  owner = np.repeat(np.arange(len(captions_per_image)), [len(c) for c in captions_per_image])
  n = len(captions_per_image)
  return Examples(np.zeros((n, 2, 2, 3), np.uint8), np.arange(n), captions, owner,
                  tuple(np.array([0], np.int32) for _ in range(n)))


# The tiny config under a strategy that carries every kind of continual state (regularizer, replay memory).
EWC_REPLAY_OVERRIDES = {"train.strategy": "ewc+replay", "continual.replay.memory_per_task": 20}


def tiny_config(**overrides):
  """``configs/tiny.py`` with ``{"section.field": value}`` overrides applied."""
  from configs import tiny  # noqa: PLC0415

  config = tiny.get_config()
  for path, value in overrides.items():
    *sections, field = path.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[field] = value
  return config


@contextlib.contextmanager
def plots_drawn():
  """Within it, runs draw their plots (``CCMR_JAX_PLOTS=1``); the setting before it is restored after."""
  before = os.environ["CCMR_JAX_PLOTS"]
  os.environ["CCMR_JAX_PLOTS"] = "1"
  try:
    yield
  finally:
    os.environ["CCMR_JAX_PLOTS"] = before


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """One finished run of ``configs/tiny.py`` (``finetune``) with its plots, shared read-only: ``(workdir, results)``."""
  from ccmr_jax import experiment  # noqa: PLC0415

  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  with plots_drawn():
    return workdir, experiment.run(tiny_config(), workdir)


@pytest.fixture(scope="session")
def ewc_replay_run(tmp_path_factory):
  """One finished tiny ``ewc+replay`` run, shared read-only (tests that damage it work on a copy)."""
  from ccmr_jax import experiment  # noqa: PLC0415

  workdir = str(tmp_path_factory.mktemp("ewc_replay_run"))
  return workdir, experiment.run(tiny_config(**EWC_REPLAY_OVERRIDES), workdir)
