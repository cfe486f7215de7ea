"""Replay memory: selection rules, plain-array storage, and mixed batches."""

import json

import numpy as np
import pytest

from ccmr_jax.continual.replay import (
    SELECTIONS,
    MixedSampler,
    ReplayMemory,
    herding_rows,
    replay_size,
    reservoir_rows,
    select_rows,
)
from ccmr_jax.data.batches import PairSampler
from ccmr_jax.data.examples import concatenate
from ccmr_jax.data.task_split import Task, TaskStream
from ccmr_jax.data.tokenizer import build_tokenizer
from conftest import make_examples


def test_reservoir_is_a_deterministic_uniform_sample_without_replacement():
  rows = reservoir_rows(50, 10, seed=3, task=1)
  assert rows.dtype == np.int64 and len(rows) == 10 == len(np.unique(rows))
  assert np.all(np.diff(rows) > 0) and rows.min() >= 0 and rows.max() < 50
  np.testing.assert_array_equal(rows, reservoir_rows(50, 10, seed=3, task=1))
  assert not np.array_equal(rows, reservoir_rows(50, 10, seed=3, task=2))
  np.testing.assert_array_equal(reservoir_rows(6, 10, seed=0, task=0), np.arange(6))
  # Every row is kept with probability M/N = 0.2: 1,000 draws put each count near 200.
  counts = np.bincount(np.concatenate([reservoir_rows(50, 10, seed=s, task=0) for s in range(1000)]), minlength=50)
  assert counts.min() > 140 and counts.max() < 260


def test_herding_follows_the_running_mean_by_hand():
  # mean = (0, 0.75). k=1: (0,0) is nearest. k=2: (0,3)/2 = (0,1.5) is. k=3: (±2,3)/3 tie, the smaller row wins.
  embeddings = np.array([[2.0, 0.0], [0.0, 0.0], [-2.0, 0.0], [0.0, 3.0]])
  np.testing.assert_array_equal(herding_rows(embeddings, 4), [1, 3, 0, 2])
  np.testing.assert_array_equal(herding_rows(embeddings, 2), [1, 3])
  np.testing.assert_array_equal(herding_rows(embeddings, 9), [1, 3, 0, 2])


def test_herding_approximates_the_mean_better_than_a_random_pick():
  embeddings = np.random.default_rng(0).standard_normal((200, 8))
  mean = embeddings.mean(0)
  herded = np.linalg.norm(embeddings[herding_rows(embeddings, 10)].mean(0) - mean)
  random = np.linalg.norm(embeddings[reservoir_rows(200, 10, seed=0, task=0)].mean(0) - mean)
  assert herded < 0.2 * random


def test_select_rows_dispatches_by_name_and_checks_its_inputs():
  embeddings = np.random.default_rng(1).standard_normal((30, 4))
  np.testing.assert_array_equal(select_rows("reservoir", 30, 5, seed=2, task=1), reservoir_rows(30, 5, 2, 1))
  np.testing.assert_array_equal(select_rows("herding", 30, 5, seed=2, task=1, image_embeddings=embeddings),
                                herding_rows(embeddings, 5))
  with pytest.raises(ValueError, match=r"unknown replay selection 'fifo'.*\['reservoir', 'herding'\]"):
    select_rows("fifo", 30, 5, seed=0, task=0)
  with pytest.raises(ValueError, match="herding needs the image embeddings of all 30"):
    select_rows("herding", 30, 5, seed=0, task=0)
  with pytest.raises(ValueError, match="memory size must be positive"):
    select_rows("reservoir", 30, 0, seed=0, task=0)
  assert SELECTIONS == ("reservoir", "herding")


def _stream(sizes=(12, 10, 8)):
  tasks = tuple(Task(t, f"t{t}", (t,), {"train": make_examples([[t]] * n, seed=t)}) for t, n in enumerate(sizes))
  return TaskStream("hand", tasks, ("a", "b", "c"), {})


def test_memory_round_trips_through_arrays_json_and_npz(tmp_path):
  memory = ReplayMemory().add_task(0, [3, 1, 7]).add_task(2, np.array([5], np.int32))
  assert memory.tasks == (0, 2) and len(memory) == 4
  arrays = memory.to_arrays()
  assert {k: v.dtype for k, v in arrays.items()} == {"tasks": np.int64, "sizes": np.int64, "rows": np.int64}
  np.testing.assert_array_equal(arrays["rows"], [3, 1, 7, 5])
  from_json = ReplayMemory.from_arrays(json.loads(json.dumps({k: v.tolist() for k, v in arrays.items()})))
  memory.save(str(tmp_path / "memory.npz"))
  for restored in (ReplayMemory.from_arrays(arrays), from_json, ReplayMemory.load(str(tmp_path / "memory.npz"))):
    assert restored.tasks == memory.tasks
    for a, b in zip(restored.rows, memory.rows):
      np.testing.assert_array_equal(a, b)
  empty = ReplayMemory.from_arrays(ReplayMemory().to_arrays())
  assert empty.tasks == () and len(empty) == 0


def test_memory_refuses_inconsistent_contents():
  memory = ReplayMemory().add_task(0, [1, 2])
  with pytest.raises(ValueError, match="a task appears twice"):
    memory.add_task(0, [3])
  with pytest.raises(ValueError, match="task 1 holds a row twice"):
    memory.add_task(1, [3, 3])
  with pytest.raises(ValueError, match="1-D integer array"):
    memory.add_task(1, [0.5])
  with pytest.raises(ValueError, match="disagree"):
    ReplayMemory.from_arrays({"tasks": [0], "sizes": [3], "rows": [1, 2]})
  with pytest.raises(ValueError, match="lack"):
    ReplayMemory.from_arrays({"tasks": [0]})


def test_memory_examples_are_the_held_rows_of_each_task():
  stream = _stream()
  memory = ReplayMemory().add_task(0, [4, 0]).add_task(1, [9])
  held = memory.examples(stream)
  expected = concatenate([stream.tasks[0].splits["train"].subset([4, 0]), stream.tasks[1].splits["train"].subset([9])])
  np.testing.assert_array_equal(held.images, expected.images)
  assert held.captions == expected.captions
  np.testing.assert_array_equal(held.caption_image, expected.caption_image)
  with pytest.raises(ValueError, match="row 12 of task 0, which has 12 training images"):
    ReplayMemory().add_task(0, [12]).examples(stream)
  with pytest.raises(ValueError, match="empty"):
    ReplayMemory().examples(stream)


def _mixed(memory_rows=(0, 1, 2, 9, 10, 11), fraction=0.25):
  stream = _stream()
  current = stream.tasks[2].splits["train"]
  # Task 0's images 0..7 have the caption texts of the current task's ("image i caption j"); 8..11 do not.
  memory = ReplayMemory().add_task(0, list(memory_rows)).examples(stream) if memory_rows else None
  tokenizer = build_tokenizer(stream.training_data([0, 1, 2]).captions, 8, 4)
  return MixedSampler.create(current, memory, tokenizer, fraction), current, memory, tokenizer


def test_mixed_batches_take_the_replay_share_from_the_memory_with_distinct_keys():
  sampler, current, memory, tokenizer = _mixed()
  assert replay_size(8, 0.25) == 2 and replay_size(10, 0.25) == 3 and sampler.replay_size(8) == 2
  assert sampler.steps_per_epoch(8) == len(current) // 6
  batches = list(sampler.epoch(8, seed=1, task=2, epoch=0))
  plain = list(PairSampler.create(current, tokenizer).epoch(6, seed=1, task=2, epoch=0))
  assert len(batches) == len(plain) == 1
  batch = batches[0]
  assert {k: v.shape[0] for k, v in batch.items()} == {"image": 8, "tokens": 8, "image_key": 8, "text_key": 8}
  for key in batch:  # the current part is exactly the plain sampler's batch of B - R
    np.testing.assert_array_equal(batch[key][:6], plain[0][key])
  memory_rows = batch["image_key"][6:] - len(current)
  assert len(np.unique(memory_rows)) == 2 and memory_rows.min() >= 0 and memory_rows.max() < len(memory)
  np.testing.assert_array_equal(batch["image"][6:], memory.images[memory_rows])
  for row, tokens, text_key in zip(memory_rows, batch["tokens"][6:], batch["text_key"][6:]):
    own = np.flatnonzero(memory.caption_image == row)
    assert any(np.array_equal(tokenizer.encode([memory.captions[c]])[0], tokens)
               and sampler.memory.text_keys[c] == text_key for c in own)
  # A memory caption with the text of a current caption shares that caption's key; other texts get new keys.
  current_keys = sampler.current.text_keys
  for c, text in enumerate(memory.captions):
    same_text = [i for i, current_text in enumerate(current.captions) if current_text == text]
    if same_text:
      assert sampler.memory.text_keys[c] == current_keys[same_text[0]]
    else:
      assert sampler.memory.text_keys[c] > current_keys.max()
  assert len(np.unique(sampler.memory.text_keys)) == memory.num_captions


def test_mixed_batches_are_deterministic_and_differ_between_epochs():
  sampler, *_ = _mixed()
  first, again, other = (list(sampler.epoch(8, seed=1, task=2, epoch=e)) for e in (0, 0, 1))
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not all(np.array_equal(a["image_key"], b["image_key"]) for a, b in zip(first, other))


def test_process_shares_make_up_the_global_mixed_batch():
  sampler, *_ = _mixed()
  whole = list(sampler.epoch(8, seed=4, task=2, epoch=0))
  halves = [list(sampler.epoch(8, seed=4, task=2, epoch=0, process_index=p, process_count=2)) for p in (0, 1)]
  for step, batch in enumerate(whole):
    shares = [h[step] for h in halves]
    assert all(len(s["image_key"]) == 4 for s in shares)
    np.testing.assert_array_equal(np.sort(np.concatenate([s["image_key"] for s in shares])),
                                  np.sort(batch["image_key"]))
  odd, *_ = _mixed(fraction=0.125)  # one replayed pair cannot be split over two processes
  with pytest.raises(ValueError, match="not divisible by the 2 processes"):
    next(odd.epoch(8, seed=0, task=2, epoch=0, process_index=0, process_count=2))


def test_edge_cases_of_the_mixed_sampler():
  no_memory, current, _, tokenizer = _mixed(memory_rows=())
  plain = PairSampler.create(current, tokenizer)
  assert no_memory.steps_per_epoch(8) == plain.steps_per_epoch(8)
  for a, b in zip(no_memory.epoch(8, 0, 2, 0), plain.epoch(8, 0, 2, 0)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  small, *_ = _mixed(memory_rows=(3,), fraction=0.25)  # fewer memory images than replayed pairs: repeats
  batch = next(small.epoch(8, seed=0, task=2, epoch=0))
  assert len(batch["image_key"]) == 8 and len(set(batch["image_key"][6:].tolist())) == 1
  tiny, *_ = _mixed(fraction=0.05)
  with pytest.raises(ValueError, match="gives 0 replayed pairs"):
    tiny.steps_per_epoch(8)
  with pytest.raises(ValueError, match=r"replay fraction must be in \(0, 1\)"):
    _mixed(fraction=1.0)
