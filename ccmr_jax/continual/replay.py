"""Replay: a small memory of each past task's training pairs, mixed into new batches.

At the end of task ``t`` a selection rule picks ``M`` of the task's training
images (with all their captions); :class:`ReplayMemory` keeps them as row
numbers into that task's training :class:`~ccmr_jax.data.examples.Examples`,
so the memory is a few integer arrays that save to npz or JSON without
pickle and rebuild the same images from the task stream. While task ``t' > t``
trains, :class:`MixedSampler` fills a fixed share of every batch with pairs
drawn from the memory.

Selection rules (:data:`SELECTIONS`, chosen by ``config.continual.replay.selection``):

  * ``reservoir``: a uniform random sample without replacement, drawn from
    ``(seed, task)``. Reservoir sampling (Vitter's algorithm R) over a stream
    of ``N`` items keeps every ``M``-subset with probability ``1 / C(N, M)``;
    a task's training split is finite and known when the task ends, so
    drawing the subset directly has exactly that distribution.
  * ``herding``: iCaRL's herding (Rebuffi et al. 2017) on the image
    embeddings of the task's training images: greedily add the image that
    brings the mean of the chosen embeddings closest to the mean of all of
    them (here the task's mean, where iCaRL uses a class's).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Sequence

import numpy as np

from ccmr_jax import files, manifest
from ccmr_jax.data.batches import PairSampler, caption_text_ids
from ccmr_jax.data.examples import Examples, concatenate
from ccmr_jax.data.images import decode_ahead
from ccmr_jax.data.task_split import TaskStream
from ccmr_jax.data.tokenizer import Tokenizer

SELECTIONS = ("reservoir", "herding")

# Appended to the seeds of the memory's random streams, so they never coincide
# with the streams PairSampler draws from the same (seed, task, epoch).
_RESERVOIR_STREAM = 0x5E1EC7
_REPLAY_BATCH_STREAM = 0x4E91A7


def reservoir_rows(num_images: int, memory_size: int, seed: int, task: int) -> np.ndarray:
  """A uniform random ``memory_size``-subset of ``range(num_images)``, drawn from ``(seed, task)``.

  Args:
    num_images: ``N``, the number of training images of the task.
    memory_size: ``M``; all ``N`` rows are kept when ``M >= N``.
    seed: the experiment seed.
    task: the task index.

  Returns:
    ``int64 [min(M, N)]``, sorted.
  """
  rng = np.random.default_rng([seed, task, _RESERVOIR_STREAM])
  return np.sort(rng.choice(num_images, size=min(memory_size, num_images), replace=False)).astype(np.int64)


def herding_rows(embeddings: np.ndarray, memory_size: int) -> np.ndarray:
  r"""iCaRL herding: rows whose running mean best approximates the mean embedding.

  With ``e_n`` the embeddings and ``mu = 1/N sum_n e_n``, step ``k = 1..M``
  picks, among the rows not chosen yet::

      p_k = argmin_n || mu - 1/k (e_n + sum_{j<k} e_{p_j}) ||_2

  (ties go to the smaller row). The order is the herding order: every prefix
  of the result is itself the herding choice for that smaller memory.

  Args:
    embeddings: ``float [N, D]``, e.g. the unit image embeddings of a task's
      training images by the snapshot that just learned it.
    memory_size: ``M``; all ``N`` rows (in herding order) when ``M >= N``.

  Returns:
    ``int64 [min(M, N)]`` distinct rows, in the order they were picked.
  """
  embeddings = np.asarray(embeddings, np.float64)
  if embeddings.ndim != 2 or len(embeddings) == 0:
    raise ValueError(f"herding needs embeddings of shape [N, D] with N >= 1, got {embeddings.shape}")
  mean = embeddings.mean(axis=0)
  chosen_sum = np.zeros_like(mean)
  available = np.ones(len(embeddings), bool)
  rows = []
  for k in range(1, min(memory_size, len(embeddings)) + 1):
    distances = np.linalg.norm(mean - (chosen_sum + embeddings) / k, axis=1)
    row = int(np.argmin(np.where(available, distances, np.inf)))
    rows.append(row)
    available[row] = False
    chosen_sum += embeddings[row]
  return np.asarray(rows, np.int64)


def select_rows(selection: str, num_images: int, memory_size: int, *, seed: int, task: int,
                image_embeddings: np.ndarray | None = None) -> np.ndarray:
  """The training rows of task ``task`` to keep, by the rule named ``selection``.

  Args:
    selection: one of :data:`SELECTIONS`.
    num_images: number of training images of the task.
    memory_size: ``M > 0``, images kept per task.
    seed: the experiment seed (``reservoir``).
    task: the task index (``reservoir``).
    image_embeddings: ``[num_images, D]``, required by ``herding``.

  Returns:
    ``int64`` rows into the task's training split.

  Raises:
    ValueError: an unknown selection, a non-positive memory size, or
      ``herding`` without embeddings for every image.
  """
  if selection not in SELECTIONS:
    raise ValueError(f"unknown replay selection {selection!r}; choose one of {list(SELECTIONS)}")
  if not memory_size > 0:
    raise ValueError(f"replay memory size must be positive, got {memory_size!r}")
  if selection == "reservoir":
    return reservoir_rows(num_images, memory_size, seed, task)
  if image_embeddings is None or len(image_embeddings) != num_images:
    raise ValueError(f"herding needs the image embeddings of all {num_images} training images of task {task}")
  return herding_rows(image_embeddings, memory_size)


def _as_rows(rows, what: str) -> np.ndarray:
  array = np.asarray(rows)
  if array.ndim != 1 or not (array.dtype.kind in "iu" or array.size == 0):
    raise ValueError(f"{what} must be a 1-D integer array, got {array.dtype} {array.shape}")
  if array.size and array.min() < 0:
    raise ValueError(f"{what} has negative entries")
  return array.astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class ReplayMemory:
  """The replayed rows of each past task.

  Attributes:
    tasks: the tasks held, in the order they were added.
    rows: per task, ``int64`` rows into ``stream.tasks[task].splits["train"]``.
  """

  tasks: tuple[int, ...] = ()
  rows: tuple[np.ndarray, ...] = ()

  def __post_init__(self):
    if len(self.tasks) != len(self.rows):
      raise ValueError(f"ReplayMemory: {len(self.tasks)} tasks but {len(self.rows)} row arrays")
    object.__setattr__(self, "tasks", tuple(int(t) for t in self.tasks))
    object.__setattr__(self, "rows", tuple(_as_rows(r, f"rows of task {t}") for t, r in zip(self.tasks, self.rows)))
    if len(set(self.tasks)) != len(self.tasks):
      raise ValueError(f"ReplayMemory: a task appears twice in {list(self.tasks)}")
    for task, rows in zip(self.tasks, self.rows):
      if len(np.unique(rows)) != len(rows):
        raise ValueError(f"ReplayMemory: task {task} holds a row twice")

  def __len__(self) -> int:
    """The number of images held, over all tasks."""
    return sum(len(r) for r in self.rows)

  def add_task(self, task: int, rows: Sequence[int] | np.ndarray) -> "ReplayMemory":
    """A new memory that also holds ``rows`` of task ``task`` (this one is unchanged)."""
    return ReplayMemory((*self.tasks, task), (*self.rows, rows))

  def examples(self, stream: TaskStream) -> Examples:
    """The held images with all their captions, task after task, as one :class:`Examples`.

    Raises:
      ValueError: the memory is empty, or a task or row is not in ``stream``.
    """
    if not self.tasks:
      raise ValueError("the replay memory is empty")
    parts = []
    for task, rows in zip(self.tasks, self.rows):
      if not 0 <= task < len(stream):
        raise ValueError(f"the replay memory holds task {task} but the stream has {len(stream)} tasks")
      train = stream.tasks[task].splits["train"]
      if len(rows) and rows.max() >= len(train):
        raise ValueError(f"the replay memory holds row {rows.max()} of task {task}, "
                         f"which has {len(train)} training images")
      parts.append(train.subset(rows))
    return concatenate(parts)

  def to_arrays(self) -> dict[str, np.ndarray]:
    """``{"tasks": int64 [K], "sizes": int64 [K], "rows": int64 [sum(sizes)]}``: plain arrays.

    ``rows`` is the tasks' rows one after the other; ``sizes`` says how many
    belong to each task. ``{k: v.tolist()}`` of it is valid JSON.
    """
    return {"tasks": np.asarray(self.tasks, np.int64),
            "sizes": np.asarray([len(r) for r in self.rows], np.int64),
            "rows": np.concatenate([np.zeros(0, np.int64), *self.rows])}

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, Sequence[int] | np.ndarray]) -> "ReplayMemory":
    """The inverse of :meth:`to_arrays` (also accepts the lists of its JSON form)."""
    missing = {"tasks", "sizes", "rows"} - set(arrays)
    if missing:
      raise ValueError(f"replay memory arrays lack {sorted(missing)}")
    tasks = _as_rows(arrays["tasks"], "replay memory 'tasks'")
    sizes = _as_rows(arrays["sizes"], "replay memory 'sizes'")
    rows = _as_rows(arrays["rows"], "replay memory 'rows'")
    if len(sizes) != len(tasks) or sizes.sum() != len(rows):
      raise ValueError(f"replay memory arrays disagree: {len(tasks)} tasks, {len(sizes)} sizes "
                       f"adding up to {sizes.sum()}, {len(rows)} rows")
    per_task = np.split(rows, np.cumsum(sizes)[:-1]) if len(tasks) else []
    return cls(tuple(int(t) for t in tasks), tuple(per_task))

  def save(self, path: str) -> None:
    """Writes :meth:`to_arrays` to ``path`` (``.npz``, all-or-nothing)."""
    manifest.save_npz(path, **self.to_arrays())

  @classmethod
  def load(cls, path: str) -> "ReplayMemory":
    """Reads a memory written by :meth:`save` (never unpickles).

    Raises:
      files.CorruptFileError: the file is not such a memory.
    """
    try:
      return cls.from_arrays(manifest.load_npz(path))
    except files.CorruptFileError:
      raise
    except ValueError as e:
      raise files.CorruptFileError(f"{path}: {e}; delete it with the snapshots of its task and later ones "
                                   "to retrain them") from e


def replay_size(batch_size: int, replay_fraction: float) -> int:
  """``round(batch_size * replay_fraction)``, halves rounded up: the memory pairs of a batch."""
  return int(np.floor(batch_size * replay_fraction + 0.5))


@dataclasses.dataclass(frozen=True)
class MixedSampler:
  """Batches of the current task's pairs with a fixed share of replayed pairs.

  A global batch of ``B`` pairs holds ``R = replay_size(B, replay_fraction)``
  pairs from the memory and ``B - R`` from the current task. The current
  task's part is exactly ``PairSampler.epoch`` with batch size ``B - R``, so
  an epoch still visits every current image once and has
  ``N_current // (B - R)`` steps. The memory's part of step ``s`` of epoch
  ``e`` is drawn from ``(seed, task, epoch, step)``: ``R`` distinct memory
  images (with replacement only if the memory holds fewer than ``R``), each
  with one of its captions.

  Keys keep the loss's duplicate masking right across the two sources: memory
  images get ``image_key = N_current + row`` (tasks are disjoint by image, so
  no memory image equals a current one), and caption texts are numbered over
  both sources together, so equal texts share a ``text_key`` and different
  ones never do. The current part's keys are those ``PairSampler`` gives.

  With several processes each one yields its own ``(B - R) / P`` current
  pairs followed by its ``R / P`` memory pairs; both must divide evenly.
  Without a memory (``memory=None``) it is the plain :class:`PairSampler`.
  """

  current: PairSampler
  memory: PairSampler | None
  replay_fraction: float

  @classmethod
  def create(cls, current: Examples, memory: Examples | None, tokenizer: Tokenizer,
             replay_fraction: float) -> "MixedSampler":
    """Samplers for the current task's training data and the memory's examples.

    Args:
      current: the current task's training :class:`Examples`.
      memory: :meth:`ReplayMemory.examples`, or None before any task is held.
      tokenizer: the run's tokenizer.
      replay_fraction: share of each batch taken from the memory, ``0 < f < 1``.
    """
    if not 0 < replay_fraction < 1:
      raise ValueError(f"replay fraction must be in (0, 1), got {replay_fraction!r}")
    current_sampler = PairSampler.create(current, tokenizer)
    if memory is None:
      return cls(current_sampler, None, replay_fraction)
    joint_text_ids = caption_text_ids(current.captions + memory.captions)
    memory_sampler = dataclasses.replace(PairSampler.create(memory, tokenizer),
                                         text_keys=joint_text_ids[current.num_captions:])
    return cls(current_sampler, memory_sampler, replay_fraction)

  def replay_size(self, batch_size: int) -> int:
    """Memory pairs per global batch: 0 without a memory."""
    if self.memory is None:
      return 0
    size = replay_size(batch_size, self.replay_fraction)
    if not 0 < size < batch_size:
      raise ValueError(f"replay fraction {self.replay_fraction} of batch_size={batch_size} gives {size} "
                       "replayed pairs; it must leave at least one pair from each source")
    return size

  def steps_per_epoch(self, batch_size: int) -> int:
    return self.current.steps_per_epoch(batch_size - self.replay_size(batch_size))

  def epoch(self, batch_size: int, seed: int, task: int, epoch: int,
            process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """The batches of one epoch (this process's share of each global batch), keys as ``PairSampler``.

    File-backed images are read ahead (and augmented) as in :meth:`PairSampler.epoch`.
    """
    return decode_ahead(self._lazy_epoch(batch_size, seed, task, epoch, process_index, process_count),
                        self.current.examples.images, (seed, task, epoch))

  def _lazy_epoch(self, batch_size: int, seed: int, task: int, epoch: int,
                  process_index: int, process_count: int) -> Iterator[dict[str, np.ndarray]]:
    num_replayed = self.replay_size(batch_size)
    current_batches = self.current.lazy_epoch(batch_size - num_replayed, seed, task, epoch, process_index,
                                              process_count)
    if self.memory is None:
      yield from current_batches
      return
    if num_replayed % process_count:
      raise ValueError(f"{num_replayed} replayed pairs per batch are not divisible by the "
                       f"{process_count} processes; change the replay fraction")
    share = num_replayed // process_count
    offset = len(self.current.examples)
    memory_images = len(self.memory.examples)
    for step, batch in enumerate(current_batches):
      rng = np.random.default_rng([seed, task, epoch, step, _REPLAY_BATCH_STREAM])
      chosen = rng.choice(memory_images, size=num_replayed, replace=memory_images < num_replayed)
      pick = rng.random(num_replayed)
      local = slice(process_index * share, (process_index + 1) * share)
      rows, pick = chosen[local], pick[local]
      choices = self.memory.captions_of_image
      caption_rows = np.asarray([choices[r][int(p * len(choices[r]))] for r, p in zip(rows, pick)])
      replayed = {
          "image": self.memory.examples.images[rows],
          "tokens": self.memory.tokens[caption_rows],
          "image_key": (rows + offset).astype(np.int32),
          "text_key": self.memory.text_keys[caption_rows],
      }
      yield {key: np.concatenate([batch[key], replayed[key]]) for key in batch}
