"""A ``gs://`` workdir, on an in-memory stand-in for Cloud Storage (no network).

Orbax writes snapshots to ``gs://`` through its own storage layer and is not
covered here; everything else the program writes goes through
``ccmr_jax.files`` and is.
"""

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from ccmr_jax import experiment, files, index, integrity, manifest, report
from ccmr_jax import workdir as layout
from configs import tiny


class _FakeGCS(MemoryFileSystem):
  protocol = ("gs", "gcs")
  root_marker = ""
  store = {}  # its own store, apart from memory://
  pseudo_dirs = [""]


@pytest.fixture
def bucket():
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, _FakeGCS, clobber=True)
  _FakeGCS.store.clear()
  yield "gs://bucket/run"
  _FakeGCS.store.clear()


def test_files_round_trip_on_cloud_storage(bucket):
  files.atomic_write_json(f"{bucket}/eval/a.json", {"x": 1})
  assert files.read_json(f"{bucket}/eval/a.json") == {"x": 1}
  manifest.save_npz(f"{bucket}/e.npz", images=np.eye(3, dtype=np.float32))
  np.testing.assert_array_equal(manifest.load_npz(f"{bucket}/e.npz")["images"], np.eye(3))
  assert files.listdir(bucket) == ["e.npz", "e.npz.manifest.json", "eval"]
  files.atomic_write_bytes(f"{bucket}/e.npz", b"not the bytes its manifest describes")
  with pytest.raises(manifest.DamagedError, match="e.npz has 36 bytes, its manifest says"):
    manifest.load_npz(f"{bucket}/e.npz")
  assert files.absolute(bucket) == bucket
  with pytest.raises(TypeError, match="dtype object"):
    manifest.save_npz(f"{bucket}/bad.npz", names=np.array([{"a": 1}], dtype=object))


def test_a_scann_index_saves_to_and_loads_from_cloud_storage(bucket):
  rng = np.random.default_rng(0)
  gallery = rng.normal(size=(300, 16)).astype(np.float32)
  gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  path = index.save_searcher(index.build_searcher(gallery, 5), f"{bucket}/index/snapshot_00/task_00/images")
  names = files.listdir(path)
  assert "ccmr_index.json" in names and "scann_assets.pbtxt" in names and manifest.FOLDER_MANIFEST in names
  rows, _ = index.search(index.load_searcher(path), gallery[:20], 5)
  np.testing.assert_array_equal(rows[:, 0], np.arange(20))
  assert [(f.artifact.kind, f.status) for f in integrity.scan(bucket)] == [("index", "sound")]
  files.atomic_write_bytes(f"{path}/dataset.npy", b"flipped")
  assert [(f.artifact.kind, f.status) for f in integrity.scan(bucket)] == [("index", "damaged")]
  with pytest.raises(manifest.DamagedError, match="dataset.npy has 7 bytes"):
    index.load_searcher(path)


def test_workdir_checks_and_report_files_on_cloud_storage(bucket):
  config = tiny.get_config()
  experiment.prepare_workdir(bucket, config)
  assert files.exists(f"{bucket}/config.json")
  experiment.prepare_workdir(bucket, config)  # same config: accepted
  config.train.epochs_per_task = 3
  with pytest.raises(experiment.UserError, match="epochs_per_task"):
    experiment.prepare_workdir(bucket, config)
  evaluation = {scope: {p: {"0": {m: 10.0 for m in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5",
                                                      "t2i_r10", "rsum", "mean_r1")}}
                         for p in ("reindex", "no_reindex")} for scope in ("task_aware", "task_agnostic")}
  results = report.build_results([evaluation], ["i2t_r1", "t2i_r1", "rsum", "mean_r1"],
                                 {"config": layout.config_json(tiny.get_config()),
                                  "tasks": [{"name": "round"}]})
  plots = report.plot_results(results, bucket)
  path = report.write_report(results, bucket, plots)
  assert files.read_text(path).startswith("# Continual retrieval report")
  assert files.read_bytes(plots[0])[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_events_reach_a_cloud_workdir(bucket):
  board = report.TensorBoard(f"{bucket}/tensorboard")
  board.scalars(1, {"loss": 0.5}, "train/task_00")
  board.close()
  names = files.listdir(f"{bucket}/tensorboard")
  assert len(names) == 1 and names[0].startswith("events.out.tfevents")
  assert len(files.read_bytes(f"{bucket}/tensorboard/{names[0]}")) > 0
