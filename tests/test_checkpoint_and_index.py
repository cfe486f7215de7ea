import os

import jax
import numpy as np
import pytest

from ccmr_jax import checkpoint, evaluate, index, sharding
from ccmr_jax.models.dual_encoder import build_model
from configs import tiny


def _model_and_params(seed):
  model = build_model(tiny.get_config().model, vocab_size=30, max_length=8)
  images = np.random.default_rng(0).integers(0, 255, (16, 64, 64, 3)).astype(np.uint8)
  tokens = np.random.default_rng(1).integers(1, 30, (16, 8)).astype(np.int32)
  return model, model.init(jax.random.key(seed), images[:1], tokens[:1]), images, tokens


def test_a_snapshot_restores_alone_and_re_embeds_to_the_same_vectors(tmp_path, devices):
  mesh = sharding.make_mesh(devices)
  model, params, images, tokens = _model_and_params(0)
  embed_images, embed_texts = evaluate.make_embedders(model, mesh, batch_size=8)
  before = embed_images(params, images), embed_texts(params, tokens)
  checkpoint.save_snapshot(str(tmp_path), 3, params)
  assert checkpoint.completed_snapshots(str(tmp_path)) == [3]
  _, other, _, _ = _model_and_params(1)  # a different init supplies only the structure
  restored = checkpoint.restore_snapshot(str(tmp_path), 3, checkpoint.abstract_like(other))
  np.testing.assert_array_equal(embed_images(restored, images), before[0])
  np.testing.assert_array_equal(embed_texts(restored, tokens), before[1])


def test_a_corrupt_snapshot_is_a_clear_error(tmp_path):
  _, params, _, _ = _model_and_params(0)
  path = checkpoint.save_snapshot(str(tmp_path), 0, params)
  for root, _, names in os.walk(path):
    for name in names:
      if name not in ("_CHECKPOINT_METADATA",):
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  with pytest.raises(ValueError, match="unreadable"):
    checkpoint.restore_snapshot(str(tmp_path), 0, checkpoint.abstract_like(params))
  with pytest.raises(FileNotFoundError):
    checkpoint.restore_snapshot(str(tmp_path), 1, checkpoint.abstract_like(params))


def _unit(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_scann_search_equals_numpy_top_k_and_survives_save_and_load(tmp_path):
  rng = np.random.default_rng(0)
  gallery, queries = _unit(rng, 500, 16), _unit(rng, 40, 16)
  searcher = index.build_searcher(gallery, 10)
  rows, scores = index.search(searcher, queries, 10)
  expected = np.argsort(-(queries @ gallery.T), axis=1)[:, :10]
  np.testing.assert_array_equal(rows, expected)
  np.testing.assert_allclose(scores, np.take_along_axis(queries @ gallery.T, expected, 1), rtol=1e-5)
  path = index.save_searcher(searcher, str(tmp_path / "idx"))
  loaded_rows, _ = index.search(index.load_searcher(path), queries, 10)
  np.testing.assert_array_equal(loaded_rows, rows)


def test_index_inputs_and_files_are_checked(tmp_path):
  with pytest.raises(ValueError, match="NaN"):
    index.build_searcher(np.full((3, 4), np.nan, np.float32), 2)
  with pytest.raises(ValueError, match="unknown index mode"):
    index.build_searcher(np.ones((3, 4), np.float32), 2, mode="lsh")
  with pytest.raises(FileNotFoundError):
    index.load_searcher(str(tmp_path / "missing"))
  path = index.save_searcher(index.build_searcher(np.eye(4, dtype=np.float32), 2), str(tmp_path / "idx"))
  with open(os.path.join(path, "scann_docids.pkl"), "wb") as f:
    f.write(b"cos\nsystem\n(S'echo pwned'\ntR.")
  with pytest.raises(ValueError, match="refusing to unpickle"):
    index.load_searcher(path)


def test_only_the_newest_progress_checkpoint_is_kept_and_incomplete_folders_are_never_read(tmp_path):
  workdir = str(tmp_path)
  state = {"w": np.arange(4.0, dtype=np.float32)}
  for step in (4, 8, 12):
    checkpoint.save_progress(workdir, 1, step, jax.tree.map(lambda x: x * step, state))
  assert os.listdir(os.path.join(workdir, "progress", "task_01")) == ["step_000012"]
  # What Orbax leaves when killed mid-write: a temporary folder, renamed only once complete.
  os.makedirs(os.path.join(workdir, "progress", "task_01", "step_000016.orbax-checkpoint-tmp-1764600000"))
  os.makedirs(os.path.join(workdir, "snapshots", "task_02.orbax-checkpoint-tmp-1764600000"))
  assert checkpoint.latest_progress(workdir, 1) == 12
  assert checkpoint.completed_snapshots(workdir) == []
  restored = checkpoint.restore_progress(workdir, 1, 12, checkpoint.abstract_like(state))
  np.testing.assert_array_equal(restored["w"], state["w"] * 12)
  checkpoint.clear_progress(workdir, 1)
  assert checkpoint.latest_progress(workdir, 1) is None


def _fit_with(step_fn, checkpoint_every):
  from ccmr_jax import train
  saved = []
  batches = ({"image": np.zeros((8, 1), np.float32)} for _ in range(6))
  train.fit(train.TrainState(np.int32(0), {"w": np.ones(2, np.float32)}, ()), step_fn, batches,
            sharding.make_mesh(), lambda step: 0.1, 6, 0, log_every=3, checkpoint_every=checkpoint_every,
            on_checkpoint=lambda step, state: saved.append(step))
  return saved


def test_checkpoint_every_zero_writes_none_and_non_finite_params_stop_before_a_checkpoint():
  from ccmr_jax import train

  def step(state, batch, learning_rate, teacher):
    return train.TrainState(state.step + 1, state.params, state.opt_state), {"loss": np.float32(1.0)}

  assert _fit_with(step, 0) == []
  assert _fit_with(step, 2) == [2, 4]  # never at the last step: the task's end is the snapshot's

  def poisoned(state, batch, learning_rate, teacher):  # the loss stays finite, a parameter does not
    params = {"w": state.params["w"] * (np.nan if state.step == 1 else 1.0)}
    return train.TrainState(state.step + 1, params, state.opt_state), {"loss": np.float32(1.0)}

  with pytest.raises(FloatingPointError, match="non-finite parameters at step 2 of task 0"):
    _fit_with(poisoned, 2)


def test_fit_keeps_at_most_two_steps_in_flight(monkeypatch):
  """Each queued step holds its batch in host memory: fit waits for step s-2 before dispatching step s+1."""
  from ccmr_jax import train
  events = []

  def step(state, batch, learning_rate, teacher):
    events.append(("dispatch", int(state.step) + 1))
    return train.TrainState(state.step + 1, state.params, state.opt_state), {"loss": np.float32(state.step + 1)}

  monkeypatch.setattr(train.jax, "block_until_ready", lambda loss: events.append(("wait", int(loss))) or loss)
  _fit_with(step, 0)
  outstanding, finished = 0, []
  for kind, step_number in events:
    outstanding += 1 if kind == "dispatch" else -1
    assert outstanding <= train.MAX_STEPS_IN_FLIGHT, events
    if kind == "wait":
      finished.append(step_number)
  assert finished == [1, 2, 3, 4]  # steps 5 and 6 end at the task's end, where the caller reads the state
