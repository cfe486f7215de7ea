"""Drift maps: each kind against a hand-made case, storage, and fit data limited to what the system holds."""

import types

import numpy as np
import pytest

from ccmr_jax import drift_maps, experiment, policies
from ccmr_jax import workdir as layout
from ccmr_jax.continual.replay import ReplayMemory
from ccmr_jax.continual.strategies import parse_strategy
from ccmr_jax.data.task_split import Task, TaskStream
from ccmr_jax.policies import EmbeddedSplit
from configs import tiny
from conftest import make_examples


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rotation(dim, seed=0):
  q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
  return q * np.sign(np.diag(r))


def test_procrustes_recovers_a_known_rotation():
  source = _unit(np.random.default_rng(1).normal(size=(200, 16)))
  rotation = _rotation(16)
  fitted = drift_maps.fit_procrustes(source, source @ rotation)
  np.testing.assert_allclose(fitted.matrix, rotation, atol=1e-5)
  np.testing.assert_allclose(fitted(source), source @ rotation, atol=1e-5)


def test_shift_recovers_a_known_drift_vector():
  source = _unit(np.random.default_rng(2).normal(size=(100, 8)))
  drift = np.random.default_rng(3).normal(size=8) * 0.1
  fitted = drift_maps.fit_shift(source, source + drift)
  assert fitted.matrix is None
  np.testing.assert_allclose(fitted.bias, drift, atol=1e-5)
  np.testing.assert_allclose(fitted(source), _unit(source + drift), atol=1e-5)


def test_linear_recovers_a_known_affine_map_and_ridge_shrinks_it():
  rng = np.random.default_rng(4)
  source = _unit(rng.normal(size=(300, 8)))
  matrix, bias = rng.normal(size=(8, 8)), rng.normal(size=8) * 0.1
  fitted = drift_maps.fit_linear(source, source @ matrix + bias, ridge=0.0)
  np.testing.assert_allclose(fitted.matrix, matrix, atol=1e-5)
  np.testing.assert_allclose(fitted.bias, bias, atol=1e-5)
  shrunk = drift_maps.fit_linear(source, source @ matrix + bias, ridge=1.0)
  assert np.linalg.norm(shrunk.matrix) < np.linalg.norm(matrix)
  residual = drift_maps.fit("residual", source, source @ matrix + bias, ridge=0.0)
  np.testing.assert_allclose(residual.matrix, matrix, atol=1e-5)  # no ridge: the same least squares


def test_the_residual_map_keeps_directions_the_fit_data_do_not_span():
  rng = np.random.default_rng(7)
  source = np.zeros((200, 6))
  source[:, :3] = _unit(rng.normal(size=(200, 3)))  # the fit data live in the first 3 directions
  target = source.copy()
  target[:, :3] = source[:, :3] @ _rotation(3, seed=8)
  probe = np.eye(6)[3:]  # items along directions the fit data never saw
  residual = drift_maps.fit("residual", source, target, ridge=1e-3)
  np.testing.assert_allclose(residual.matrix[3:], np.eye(6)[3:], atol=1e-9)
  np.testing.assert_allclose(residual(probe), probe, atol=5e-3)  # the bias of the fitted directions only
  assert np.abs(drift_maps.fit("linear", source, target, ridge=1e-3).matrix[3:]).max() < 1e-6  # shrunk to zero


def test_maps_return_unit_vectors_and_refuse_bad_input():
  source = _unit(np.random.default_rng(5).normal(size=(50, 4)))
  for kind in drift_maps.MAP_KINDS:
    moved = drift_maps.fit(kind, source, _unit(source + 0.3))(source)
    assert moved.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(moved, axis=1), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="unknown map kind"):
    drift_maps.fit("affine", source, source)
  with pytest.raises(ValueError, match="paired"):
    drift_maps.fit_shift(source, source[:10])
  with pytest.raises(ValueError, match="ridge"):
    drift_maps.fit_linear(source, source, ridge=-1.0)


def test_fitted_maps_survive_storage_and_move_both_modalities(tmp_path):
  rng = np.random.default_rng(6)
  current = EmbeddedSplit(_unit(rng.normal(size=(40, 6))), _unit(rng.normal(size=(80, 6))))
  rotations = {k: _rotation(6, seed=10 + k) for k in range(2)}
  old = lambda k: EmbeddedSplit(*(part @ rotations[k] for part in current))
  maps = drift_maps.fit_drift_maps(2, current, old, policies.maps_needed())
  assert maps.fit_rows == {"images": 40, "captions": 80}
  path = str(tmp_path / "maps.npz")
  maps.save(path)
  loaded = drift_maps.DriftMaps.load(path, 2)
  for k in range(2):
    moved = loaded.apply("procrustes", "to_old", k, current)
    np.testing.assert_allclose(moved.captions, current.captions @ rotations[k], atol=1e-5)
    back = loaded.apply("linear", "to_new", k, old(k))
    np.testing.assert_allclose(back.images, current.images, atol=5e-3)  # ridge 1e-3 shrinks a little
  with pytest.raises(ValueError, match="no shift map to_old snapshot 2"):
    loaded.apply("shift", "to_old", 2, current)


def _stream(num_tasks=3, per_task=6):
  tasks = []
  for t in range(num_tasks):
    splits = {}
    for n, split in enumerate(("train", "val", "test")):
      examples = make_examples([[t]] * per_task, seed=10 * t + n)
      ids = 1000 * t + 100 * n + np.arange(per_task)
      splits[split] = type(examples)(examples.images, ids, examples.captions, examples.caption_image, examples.labels)
    tasks.append(Task(t, f"task{t}", (t,), splits))
  return TaskStream("hand-made", tuple(tasks), tuple(f"c{t}" for t in range(num_tasks)), {})


def test_fit_data_is_the_current_task_and_the_replay_memory_only(tmp_path):
  stream = _stream()
  workdir = str(tmp_path)
  memory = ReplayMemory((0, 1), (np.array([1, 3]), np.array([0])))
  memory.save(layout.replay_path(workdir, 1))  # what the run keeps after task 1
  ReplayMemory((0, 1, 2), (np.array([1, 3]), np.array([0]), np.array([5]))).save(layout.replay_path(workdir, 2))
  config = tiny.get_config()
  config.eval.drift_maps = {"fit_images": 4, "ridge": 1e-3}
  allowed = {"replay": set(stream.tasks[2].splits["train"].image_ids) | {1, 3, 1000},
             "finetune": set(stream.tasks[2].splits["train"].image_ids)}
  for strategy, ids in allowed.items():
    components = types.SimpleNamespace(strategy=parse_strategy(strategy), stream=stream)
    fit = experiment.drift_map_fit_data(components, 2, workdir, config)
    assert set(fit.image_ids) <= ids, strategy  # no later task, no old raw data beyond the memory
    assert len(set(fit.image_ids) & set(stream.tasks[2].splits["train"].image_ids)) == 4
    assert fit.num_captions == 2 * len(fit)
  replayed = experiment.drift_map_fit_data(types.SimpleNamespace(strategy=parse_strategy("replay"), stream=stream), 2,
                                           workdir, config)
  assert {1, 3, 1000} <= set(replayed.image_ids)
  again = experiment.drift_map_fit_data(types.SimpleNamespace(strategy=parse_strategy("replay"), stream=stream), 2,
                                        workdir, config)
  assert list(again.image_ids) == list(replayed.image_ids)  # the same seeded draw on a rerun
  with pytest.raises(ValueError, match="fit_images"):
    drift_maps.fit_examples(stream.tasks[0].splits["train"], 0, None, 0, 0)
