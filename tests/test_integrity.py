"""Every artifact kind of a finished run damaged three ways: each rerun repairs it or stops with one line.

The run (tiny config, EWC + replay, both policies) holds one artifact of every
kind. Each case copies it, damages one artifact — truncated to half, 64 bytes
flipped in the middle, or deleted (a folder artifact: its largest file) — and
reruns the same config. A computed artifact must be planned for recomputation
and, rerun in full after one of the damages (each damage for some kinds), come
back with results equal float for float to the untouched run's; a trained one
must stop the rerun with a one-line error naming it, leaving the workdir as it
was.
"""

import os
import shutil
import subprocess
import sys

import pytest

from ccmr_jax import checkpoint, experiment, integrity, manifest
from conftest import EWC_REPLAY_OVERRIDES, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One instance of every kind, chosen where a rerun reads it: task 0's artifacts are what task 1 was built on.
ARTIFACTS = {
    "config": "config.json",
    "tokenizer": "tokenizer.json",
    "zero_shot": "eval/zero_shot.json",
    "evaluation": "eval/after_task_00.json",
    "results": "results.json",
    "snapshot": "snapshots/task_00",
    "regularizers": "continual/task_00/regularizers",
    "replay": "continual/task_00/replay.npz",
    "embeddings": "embeddings/snapshot_00/task_00.npz",
    "gallery": "galleries/task_00.json",
    "index": "index/snapshot_00/task_00/images",
    "union_index": "index/union/no_reindex/after_task_01/captions",
    "mapped_index": "index/mapped/remap_linear/after_task_01/task_00/images",
    "drift_maps": "maps/after_task_01.npz",
}
REPAIRED = {"tokenizer", "zero_shot", "evaluation", "results", "embeddings", "gallery", "index", "union_index",
            "mapped_index", "drift_maps"}
DAMAGES = ("truncate", "flip", "delete")
NUMBERS = ("tasks_trained", "zero_shot", "policies", "policies_agnostic", "analysis", "analysis_summary")


def _config(**extra):
  return tiny_config(**EWC_REPLAY_OVERRIDES, **extra)


def _numbers(results: dict) -> dict:
  return {key: results[key] for key in NUMBERS}


@pytest.fixture(scope="module")
def finished(ewc_replay_run):
  workdir, results = ewc_replay_run
  return workdir, _numbers(results)


def _target(path: str) -> str:
  """The file a damage hits: the artifact itself, or a folder artifact's largest file."""
  if not os.path.isdir(path):
    return path
  inside = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names
            if name != manifest.FOLDER_MANIFEST]
  return max(inside, key=os.path.getsize)


def damage(path: str, how: str) -> None:
  target = _target(path)
  if how == "delete":
    os.remove(target)
    return
  data = bytearray(open(target, "rb").read())
  if how == "truncate":
    data = data[:len(data) // 2]
  else:
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
  with open(target, "wb") as f:
    f.write(data)


def _listing(workdir: str) -> dict:
  return {os.path.relpath(os.path.join(root, name), workdir): os.path.getsize(os.path.join(root, name))
          for root, _, names in os.walk(workdir) for name in names if name != ".lock"}


def _rerun_damage(kind: str) -> str:
  """The damage after which a computed kind's rerun runs in full: the kinds take the damages in turn.

  The other two damages of that kind are checked as far as the rerun's plan (the artifact is found
  damaged and will be recomputed): the repair itself does not depend on how the bytes were damaged.
  """
  return DAMAGES[sorted(REPAIRED).index(kind) % len(DAMAGES)]


def test_every_artifact_kind_is_in_the_damage_table():
  # progress checkpoints exist only mid-task: test_a_damaged_progress_checkpoint... covers them.
  assert set(ARTIFACTS) | {"progress"} == set(integrity.PATTERNS)
  assert {_rerun_damage(kind) for kind in REPAIRED} == set(DAMAGES)  # every damage is repaired in full somewhere
  assert set(ARTIFACTS) - REPAIRED | {"progress"} == set(integrity.TRAINED) | {"config"}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", sorted(ARTIFACTS))
def test_a_damaged_artifact_is_recomputed_to_the_same_numbers_or_named(finished, tmp_path, kind, how):
  workdir, reference = finished
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  damage(os.path.join(copy, ARTIFACTS[kind]), how)
  if kind in REPAIRED:
    plan = experiment.plan_repairs(copy, _config(), repair=False)
    assert not plan.blocked and ARTIFACTS[kind] in plan.delete, plan
    if how == _rerun_damage(kind):  # each kind rerun in full once, every damage rerun for some kinds
      assert _numbers(experiment.run(_config(), copy)) == reference
      assert all(f.status == "sound" for f in integrity.scan(copy))
    return
  before = _listing(copy)
  with pytest.raises(experiment.UserError) as error:
    experiment.run(_config(), copy)
  message = str(error.value)
  assert os.path.join(copy, ARTIFACTS[kind]) in message and "\n" not in message
  assert ("--repair" in message) == (kind != "config")
  assert _listing(copy) == before, "a refused rerun must leave the workdir as it was"


def test_repair_retrains_a_damaged_snapshot_to_the_same_numbers(finished, tmp_path):
  workdir, reference = finished
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  damage(os.path.join(copy, "snapshots", "task_00"), "flip")
  assert _numbers(experiment.run(_config(), copy, repair=True)) == reference
  assert all(f.status == "sound" for f in integrity.scan(copy))


class _Stop(Exception):
  pass


PROGRESS_CONFIG = {"train.checkpoint_every": 2}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
  """A run that ended (as a killed one would) right after task 1's first progress checkpoint."""
  workdir = str(tmp_path_factory.mktemp("interrupted"))
  save = checkpoint.save_progress

  def save_then_stop(workdir_, task, step, state):
    save(workdir_, task, step, state)
    if task == 1:
      raise _Stop

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoint, "save_progress", save_then_stop)
    with pytest.raises(_Stop):
      experiment.run(_config(**PROGRESS_CONFIG), workdir)
  [step] = os.listdir(os.path.join(workdir, "progress", "task_01"))
  return workdir, os.path.join("progress", "task_01", step)


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_progress_checkpoint_is_named(interrupted, tmp_path, how):
  workdir, progress = interrupted
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  damage(os.path.join(copy, progress), how)
  before = _listing(copy)
  with pytest.raises(experiment.UserError) as error:
    experiment.run(_config(**PROGRESS_CONFIG), copy)
  assert f"{os.path.join(copy, progress)} is damaged" in str(error.value)
  assert "--repair to restart task 1 from its beginning" in str(error.value) and "\n" not in str(error.value)
  assert _listing(copy) == before


def test_repair_restarts_a_task_whose_progress_checkpoint_is_damaged(finished, interrupted, tmp_path):
  _, reference = finished
  workdir, progress = interrupted
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  damage(os.path.join(copy, progress), "flip")
  assert _numbers(experiment.run(_config(**PROGRESS_CONFIG), copy, repair=True)) == reference


def test_an_interrupted_write_counts_as_absent(finished, tmp_path):
  workdir, reference = finished
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  for relative in ("eval/after_task_01.json", "snapshots/task_01"):  # as if killed before the manifests
    path = os.path.join(copy, relative)
    os.remove(manifest.sidecar(path) if not os.path.isdir(path) else os.path.join(path, manifest.FOLDER_MANIFEST))
  plan = integrity.plan_rerun(copy, integrity.scan(copy), 2, ("snapshot", "regularizers", "replay"), repair=False)
  assert (plan.resume, plan.train, plan.blocked) == (1, [1], [])
  assert _numbers(experiment.run(_config(), copy)) == reference


def test_verify_lists_the_damage_and_its_exit_status_says_whether_the_workdir_is_sound(finished, tmp_path):
  workdir, _ = finished
  env = dict(os.environ, JAX_PLATFORMS="cpu")

  def verify(path):
    return subprocess.run([sys.executable, "-m", "ccmr_jax.verify", f"--workdir={path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)

  sound = verify(workdir)
  assert sound.returncode == 0 and "every artifact matches its manifest" in sound.stdout, sound.stderr[-2000:]
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  damage(os.path.join(copy, ARTIFACTS["snapshot"]), "truncate")
  damage(os.path.join(copy, ARTIFACTS["embeddings"]), "flip")
  damaged = _listing(copy)
  found = verify(copy)
  assert found.returncode == 1, found.stderr[-2000:]
  assert "damaged   snapshot     snapshots/task_00" in found.stdout
  assert "damaged   embeddings   embeddings/snapshot_00/task_00.npz" in found.stdout
  assert "with --repair, a rerun would train tasks [0]" in found.stdout
  assert _listing(copy) == damaged, "verify must change nothing"
  missing = verify(str(tmp_path / "nowhere"))
  assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0


def test_verify_seal_trusts_a_workdir_written_before_manifests(finished, tmp_path):
  workdir, _ = finished
  legacy = str(tmp_path / "legacy")
  shutil.copytree(workdir, legacy)
  for root, _, names in os.walk(legacy):
    for name in names:
      if name.endswith(manifest.SIDECAR_SUFFIX) or name == manifest.FOLDER_MANIFEST:
        os.remove(os.path.join(root, name))
  with pytest.raises(experiment.UserError, match="config.json has no manifest: .* --seal"):
    experiment.run(_config(), legacy)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  sealed = subprocess.run([sys.executable, "-m", "ccmr_jax.verify", f"--workdir={legacy}", "--seal"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
  assert sealed.returncode == 0, sealed.stdout[-2000:] + sealed.stderr[-2000:]
  assert f"sealed {len(integrity.scan(workdir))} artifacts" in sealed.stdout
  assert all(f.status == "sound" for f in integrity.scan(legacy))
