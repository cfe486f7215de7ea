"""One tiny end-to-end run of the real program, then resume and refusal checks."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from ccmr_jax import experiment, files
from ccmr_jax.continual.replay import ReplayMemory
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  results = experiment.run(tiny.get_config(), workdir)
  return workdir, results


def test_the_run_writes_every_stage_output(finished_run):
  workdir, results = finished_run
  for path in ("config.json", "tokenizer.json", "results.json", "report.md", "plots/recall_matrix.png",
               "plots/task_curves.png", "snapshots/task_00", "snapshots/task_01",
               "index/snapshot_00/task_00/images", "index/snapshot_01/task_00/captions",
               "index/union/no_reindex/after_task_01/images", "eval/after_task_01.json"):
    assert os.path.exists(os.path.join(workdir, path)), path
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))
  arrays = files.load_npz(os.path.join(workdir, "embeddings", "snapshot_01", "task_00.npz"))
  assert arrays["images"].shape[1] == 32 and arrays["captions"].shape[0] == len(arrays["caption_image"])
  assert json.load(open(os.path.join(workdir, "results.json"))) == json.loads(json.dumps(results))


def test_exported_embeddings_recompute_the_reported_recall(finished_run):
  workdir, results = finished_run
  from ccmr_jax import evaluate, index
  for policy, snapshot in (("reindex", 1), ("no_reindex", 0)):
    gallery = files.load_npz(os.path.join(workdir, "embeddings", f"snapshot_{snapshot:02d}", "task_00.npz"))
    queries = files.load_npz(os.path.join(workdir, "embeddings", "snapshot_01", "task_00.npz"))
    truth = evaluate.GroundTruth.from_links(gallery["caption_image"], gallery["caption_text_ids"])
    i2t = index.exact_top_k(gallery["captions"], queries["images"], 10)
    t2i = index.exact_top_k(gallery["images"], queries["captions"], 10)
    recomputed = evaluate.retrieval_metrics(i2t, t2i, truth, (1, 5, 10))
    for metric in ("i2t_r1", "i2t_r10", "t2i_r5", "rsum"):
      assert recomputed[metric] == pytest.approx(results["policies"][policy][metric]["matrix"][1][0], abs=1e-3)


def test_results_hold_both_policies_and_scopes_from_one_run(finished_run):
  _, results = finished_run
  for key in ("policies", "policies_agnostic"):
    assert set(results[key]) == {"reindex", "no_reindex"}
    for policy in results[key].values():
      matrix = policy["mean_r1"]["matrix"]
      assert len(matrix) == 2 and matrix[0][1] is None and matrix[1][0] is not None
      for metric in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "mean_r1"):
        assert {"matrix", "final_average", "forgetting", "bwt"} <= set(policy[metric])
  # With one task seen, the union gallery is that task's gallery.
  assert results["policies_agnostic"]["reindex"]["rsum"]["matrix"][0][0] == results["policies"]["reindex"]["rsum"]["matrix"][0][0]
  reindex, no_reindex = results["policies"]["reindex"], results["policies"]["no_reindex"]
  for metric in ("i2t_r1", "t2i_r10", "rsum"):
    # Task 0 after task 0 (and each task just after it is learned): same snapshot, same numbers.
    assert reindex[metric]["matrix"][0][0] == no_reindex[metric]["matrix"][0][0]
    assert reindex[metric]["matrix"][1][1] == no_reindex[metric]["matrix"][1][1]
  # After task 1 the policies embed task 0's gallery with different snapshots.
  assert reindex["rsum"]["matrix"][1][0] != no_reindex["rsum"]["matrix"][1][0]


def test_a_rerun_resumes_and_reproduces_the_numbers(finished_run, tmp_path):
  workdir, results = finished_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  # As if killed during task 1's training: its snapshot and evaluation are gone.
  shutil.rmtree(os.path.join(copy, "snapshots", "task_01"))
  os.remove(os.path.join(copy, "eval", "after_task_01.json"))
  again = experiment.run(tiny.get_config(), copy)
  assert [t["task"] for t in again["timings"]] == [1]
  assert again["policies"] == results["policies"]
  assert again["policies_agnostic"] == results["policies_agnostic"]


def test_a_workdir_of_another_config_is_refused(finished_run):
  workdir, _ = finished_run
  config = tiny.get_config()
  config.train.learning_rate = 0.5
  with pytest.raises(experiment.UserError, match=r"train.learning_rate: workdir has 0.001, this run has 0.5"):
    experiment.run(config, workdir)


@pytest.mark.parametrize("override, message", [
    ("--config.train.strategy=bogus", "unknown train.strategy component(s) ['bogus']"),
    ("--config.continual.ewc.strength=-1", "continual.ewc.strength must be a positive number"),
    ("--config.eval.split=train", "unknown eval.split 'train'"),
    ("--config.model.text_tower=lstm", "unknown model.text_tower 'lstm'"),
    ("--config.train.epochs_per_task=0", "train.epochs_per_task must be positive"),
    ("--config.train.learning_rate=-1", "train.learning_rate must be positive"),
    ("--config.loss.name=triplet", "unknown loss.name 'triplet'"),
    ("--config.data.num_tasks=9", "num_tasks=9 but the dataset has only 5 category groups"),
    ("--config.train.batch_size=12", "train.batch_size=12 is not divisible by the 8 devices"),
])
def test_bad_config_values_stop_with_a_message_and_no_traceback(tmp_path, override, message):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "ccmr_jax.main", "--config=configs/tiny.py", override,
                         f"--workdir={tmp_path / 'w'}"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr


def test_a_continual_strategy_trains_and_saves_its_state(tmp_path):
  config = tiny.get_config()
  config.train.strategy = "ewc+lwf+replay"
  config.data.scenes.num_train = 160
  workdir = str(tmp_path / "run")
  experiment.run(config, workdir)
  for path in ("results.json", "continual/task_00/regularizers", "continual/task_00/replay.npz",
               "continual/task_01/regularizers", "continual/task_01/replay.npz"):
    assert os.path.exists(os.path.join(workdir, path)), path
  memory = ReplayMemory.load(os.path.join(workdir, "continual", "task_01", "replay.npz"))
  assert memory.tasks == (0, 1) and len(memory.rows[0]) > 0
  # Task 1 trained under the EWC penalty of task 0: one consolidation before it, two after.
  for task, consolidations in ((0, 1), (1, 2)):
    path = os.path.join(workdir, "continual", f"task_{task:02d}", "regularizers")
    (ewc_state,) = ocp.StandardCheckpointer().restore(path)
    assert int(ewc_state["num_tasks"]) == consolidations


def test_an_unwritable_workdir_is_refused(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(experiment.UserError, match="cannot write to workdir"):
    experiment.run(tiny.get_config(), str(blocker / "sub"))
