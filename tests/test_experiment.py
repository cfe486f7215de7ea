"""One tiny end-to-end run of the real program, then resume and refusal checks."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ccmr_jax import drift_maps, experiment, files, manifest, policies, report
from ccmr_jax.continual.replay import ReplayMemory
from configs import tiny
from conftest import EWC_REPLAY_OVERRIDES, plots_drawn, tiny_config, xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finished_run(tiny_run):
  return tiny_run  # one tiny run shared with tests/test_search.py (tests/conftest.py)


def test_the_run_writes_every_stage_output(finished_run):
  workdir, results = finished_run
  for path in ("config.json", "tokenizer.json", "results.json", "report.md", "plots/recall_matrix.png",
               "plots/task_curves.png", "snapshots/task_00", "snapshots/task_01",
               "index/snapshot_00/task_00/images", "index/snapshot_01/task_00/captions",
               "index/union/no_reindex/after_task_01/images", "eval/after_task_01.json"):
    assert os.path.exists(os.path.join(workdir, path)), path
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))
  arrays = manifest.load_npz(os.path.join(workdir, "embeddings", "snapshot_01", "task_00.npz"))
  assert arrays["images"].shape[1] == 32 and arrays["captions"].shape[0] == len(arrays["caption_image"])
  assert json.load(open(os.path.join(workdir, "results.json"))) == json.loads(json.dumps(results))


def _plain_recall(gallery: dict, queries: dict, k: int) -> dict:
  """i2t and t2i recall@{1,5,10} with numpy alone, from README's description of the exported arrays."""
  out = {}
  pairs = {(int(i), int(t)) for i, t in zip(gallery["caption_image"], gallery["caption_text_ids"])}
  for direction, (query, item) in {"i2t": ("images", "captions"), "t2i": ("captions", "images")}.items():
    scores = queries[query] @ gallery[item].T
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    if direction == "i2t":  # a caption is right when its text is one of the query image's captions
      hits = [[(q, int(gallery["caption_text_ids"][r])) in pairs for r in row] for q, row in enumerate(ranked)]
    else:  # an image is right when one of its captions has the query caption's text
      hits = [[(int(r), int(gallery["caption_text_ids"][q])) in pairs for r in row] for q, row in enumerate(ranked)]
    hits = np.asarray(hits)
    out.update({f"{direction}_r{n}": 100.0 * hits[:, :n].any(axis=1).mean() for n in (1, 5, 10)})
  return out


def test_exported_embeddings_recompute_every_reported_cell(finished_run):
  workdir, results = finished_run
  stored = {}
  for snapshot in (0, 1):
    for task in range(snapshot + 1):
      arrays = manifest.load_npz(os.path.join(workdir, "embeddings", f"snapshot_{snapshot:02d}", f"task_{task:02d}.npz"))
      assert (arrays["images"].dtype, arrays["captions"].dtype) == (np.float32, np.float32)
      assert (arrays["image_ids"].dtype, arrays["caption_image"].dtype) == (np.int64, np.int64)
      assert arrays["caption_text_ids"].dtype == np.int32
      for part in ("images", "captions"):
        np.testing.assert_allclose(np.linalg.norm(arrays[part], axis=1), 1.0, atol=1e-5)
      stored[snapshot, task] = arrays
  for policy, gallery_snapshot in (("reindex", lambda t, k: t), ("no_reindex", lambda t, k: k)):
    for t in (0, 1):
      for k in range(t + 1):
        recomputed = _plain_recall(stored[gallery_snapshot(t, k), k], stored[t, k], 10)
        for metric, value in recomputed.items():
          assert value == pytest.approx(results["policies"][policy][metric]["matrix"][t][k], abs=1e-3), (policy, t, k)


def test_compensation_policies_recompute_from_the_exported_embeddings_and_stored_maps(finished_run):
  workdir, results = finished_run
  load = lambda s, k: manifest.load_npz(os.path.join(workdir, "embeddings", f"snapshot_{s:02d}", f"task_{k:02d}.npz"))
  maps = drift_maps.DriftMaps.load(os.path.join(workdir, "maps", "after_task_01.npz"), 1)
  old_gallery, queries = load(0, 0), load(1, 0)
  moved = {
      "no_reindex+linear": (old_gallery, {**queries, **maps.apply("linear", "to_old", 0, policies.EmbeddedSplit(
          queries["images"], queries["captions"]))._asdict()}),
      "remap_linear": ({**old_gallery, **maps.apply("linear", "to_new", 0, policies.EmbeddedSplit(
          old_gallery["images"], old_gallery["captions"]))._asdict()}, queries),
  }
  for policy, (gallery, prepared) in moved.items():
    for metric, value in _plain_recall(gallery, prepared, 10).items():
      assert value == pytest.approx(results["policies"][policy][metric]["matrix"][1][0], abs=1e-3), (policy, metric)
  assert results["policies"]["no_reindex+linear"]["rsum"]["matrix"][1][0] != \
      results["policies"]["no_reindex"]["rsum"]["matrix"][1][0]


def test_the_price_of_reindexing_counts_encoder_passes(finished_run):
  workdir, results = finished_run
  evaluations = [manifest.read_json(os.path.join(workdir, "eval", f"after_task_{t:02d}.json")) for t in (0, 1)]
  items = evaluations[1]["cost"]["items"]  # images + captions of task 0's and task 1's test split
  assert evaluations[0]["cost"]["items"] == items[:1] and evaluations[0]["cost"]["fit"]["items"] == 0
  train = results["tasks"][1]["counts"]["train"]
  assert train["images"] <= drift_maps.DEFAULT_FIT_IMAGES  # the draw is task 1's whole training split
  fit_items = 2 * (train["images"] + train["captions"])  # S_1 and S_0 both embed it
  assert evaluations[1]["cost"]["fit"]["items"] == fit_items
  cost = results["reindexing_cost"]
  assert cost["reindex"]["gallery_items_encoded"] == items[0] + items[0] + items[1]
  assert cost["reindex"]["fit_items_encoded"] == 0
  assert cost["no_reindex"]["gallery_items_encoded"] == items[0] + items[1]
  for name in ("no_reindex+shift", "remap_linear"):
    assert cost[name]["gallery_items_encoded"] == items[0] + items[1]
    assert cost[name]["total_items_encoded"] == items[0] + items[1] + fit_items
    assert cost[name]["fit_s"] > 0
  assert os.path.exists(os.path.join(workdir, "plots", "reindexing_cost.png"))
  assert "## The price of re-indexing" in open(os.path.join(workdir, "report.md")).read()


def test_results_hold_both_policies_and_scopes_from_one_run(finished_run):
  _, results = finished_run
  for key in ("policies", "policies_agnostic"):
    assert set(results[key]) == set(policies.POLICY_NAMES)
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


@pytest.mark.parametrize("path, value, message", [
    ("train.strategy", "bogus", "unknown train.strategy component(s) ['bogus']"),
    ("continual.ewc.strength", -1.0, "continual.ewc.strength must be a positive number"),
    ("continual.bct.weight", 0.0, "continual.bct.weight must be a positive number"),
    ("eval.split", "train", "unknown eval.split 'train'"),
    ("model.text_tower", "lstm", "unknown model.text_tower 'lstm'"),
    ("train.epochs_per_task", 0, "train.epochs_per_task must be positive"),
    ("train.learning_rate", -1.0, "train.learning_rate must be positive"),
    ("loss.name", "triplet", "unknown loss.name 'triplet'"),
    ("data.num_tasks", 9, "num_tasks=9 but the dataset has only 5 category groups"),
    ("train.batch_size", 12, "train.batch_size=12 is not divisible by the 8 devices"),
    ("train.checkpoint_every", -5, "train.checkpoint_every must be a whole number of steps"),
    ("eval.ann_recall_target", 1.5, "eval.ann_recall_target must be a recall in (0, 1]"),
    ("eval.drift_maps.ridge", -1.0, "eval.drift_maps.ridge must be >= 0"),
    ("eval.drift_maps.fit_images", 0, "eval.drift_maps.fit_images must be a positive whole number"),
    ("model.image_tower", "resnet9000", "unknown model.image_tower 'resnet9000'"),
    ("data.unlabeled", "own_task", "task 2 (unlabeled) has no image in the train split"),
    ("model.image_tower_weights", "/nonexistent/resnet50.npz",
     "model.image_tower_weights: no pretrained weights file at /nonexistent/resnet50.npz"),
])
def test_bad_config_values_are_user_errors_naming_the_field(tmp_path, path, value, message):
  with pytest.raises(experiment.UserError, match=re.escape(message)):
    experiment.run(tiny_config(**{path: value}), str(tmp_path / "w"))


@pytest.mark.parametrize("override, message", [
    ("--config.train.batch_size=0", "train.batch_size must be positive"),
    ("--config.data.num_tasks=9", "num_tasks=9 but the dataset has only 5 category groups"),
])
def test_bad_config_values_stop_with_a_message_and_no_traceback(tmp_path, override, message):
  """The command line's side of the user errors above: exit status 2, one line, no traceback."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "ccmr_jax.main", "--config=configs/tiny.py", override,
                         f"--workdir={tmp_path / 'w'}"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
  error_lines = [line for line in proc.stderr.splitlines() if not line.startswith(("I1", "W1", "E1"))]
  assert len(error_lines) == 1 and error_lines[0].startswith("error: "), error_lines  # one line, nothing else


def test_the_tokenizer_knows_task_0_words_only_and_hashes_later_ones(finished_run):
  workdir, _ = finished_run
  from ccmr_jax.data.examples import normalize_caption
  from ccmr_jax.data.tokenizer import Tokenizer
  tokenizer = Tokenizer.from_json(open(os.path.join(workdir, "tokenizer.json")).read())
  stream = experiment.load_task_stream(tiny.get_config())

  def words(task):
    return {w for c in stream.tasks[task].splits["train"].captions for w in normalize_caption(c).split()}

  later = sorted(words(1) - words(0))  # e.g. the shapes and colours of task 1's families
  assert later and not set(later) & set(tokenizer.words)
  assert set(tokenizer.words) == words(0)
  first_bucket = 2 + len(tokenizer.words)
  assert all(first_bucket <= tokenizer.word_id(w) < tokenizer.vocab_size for w in later)


def test_allow_config_change_through_the_command_logs_every_difference(finished_run, tmp_path):
  workdir, results = finished_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "ccmr_jax.main", "--config=configs/tiny.py", f"--workdir={copy}",
             "--config.train.log_every=3", "--config.eval.batch_size=32"]
  refused = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert refused.returncode == 2 and "--allow_config_change" in refused.stderr
  proc = subprocess.run(command + ["--allow_config_change"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "resuming" in proc.stderr and "train.log_every: workdir has 2, this run has 3" in proc.stderr
  assert "eval.batch_size: workdir has 64, this run has 32" in proc.stderr
  assert json.load(open(os.path.join(copy, "config.json")))["train"]["log_every"] == 3
  assert json.load(open(os.path.join(copy, "results.json")))["policies"] == results["policies"]


def test_a_run_without_plots_says_so_and_a_rerun_draws_them(ewc_replay_run, tmp_path):
  source, results = ewc_replay_run  # run with CCMR_JAX_PLOTS=0 (tests/conftest.py)
  assert not os.path.exists(os.path.join(source, "plots", "recall_matrix.png"))
  assert "Not drawn: the run had CCMR_JAX_PLOTS=0" in open(os.path.join(source, "report.md")).read()
  workdir = str(tmp_path / "copy")
  shutil.copytree(source, workdir)
  with plots_drawn():
    assert experiment.run(tiny_config(**EWC_REPLAY_OVERRIDES), workdir)["policies"] == results["policies"]
  drawn = {"recall_matrix.png", "task_curves.png", "reindexing_cost.png", "analysis.png", "examples.png"}
  assert drawn <= set(os.listdir(os.path.join(workdir, "plots")))
  assert "Not drawn" not in open(os.path.join(workdir, "report.md")).read()


def test_a_bad_plots_setting_stops_the_run_before_it_starts(tmp_path, monkeypatch):
  monkeypatch.setenv("CCMR_JAX_PLOTS", "yes")
  with pytest.raises(experiment.UserError, match="CCMR_JAX_PLOTS='yes': set it to 1"):
    experiment.run(tiny_config(), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "config.json")  # nothing that a rerun would trust


def test_a_continual_strategy_trains_and_saves_its_state(ewc_replay_run):
  workdir, _ = ewc_replay_run  # the tiny config under ewc+replay (tests/conftest.py)
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


@pytest.mark.slow
def test_lwf_and_bct_train_sharded_over_two_devices(tmp_path):
  # Without a persistent compilation cache: on jax 0.10.2 the LwF step, loaded from that cache, deadlocks in
  # XLA:CPU's all-gathers on 2 devices (a fresh compile never did in 3,000 steps and 14 runs on 2 and 8
  # devices). A hang fails this test through its timeout.
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
  workdir = str(tmp_path / "run")
  proc = subprocess.run([sys.executable, "-m", "ccmr_jax.main", "--config=configs/tiny.py",
                         "--config.train.strategy=lwf+bct", "--config.train.epochs_per_task=3",
                         f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # LwF distilled from S_0 while task 1 trained, and had no teacher on task 0.
  distillation = _logged_scalars(os.path.join(workdir, "tensorboard"), "distillation")
  assert distillation["train/task_00/distillation"] and not any(distillation["train/task_00/distillation"])
  # On task 1 the student starts as the teacher (a KL of 0 up to rounding) and then moves away from it.
  assert abs(distillation["train/task_01/distillation"][0]) < 1e-3 < distillation["train/task_01/distillation"][-1]
  # The backward-compatible term (bct) against the same teacher: none on task 0, positive on task 1.
  compatibility = _logged_scalars(os.path.join(workdir, "tensorboard"), "compatibility")
  assert not any(compatibility["train/task_00/compatibility"]) and min(compatibility["train/task_01/compatibility"]) > 0


def _logged_scalars(folder: str, suffix: str) -> dict[str, list[float]]:
  """Every TensorBoard scalar under ``folder`` whose tag ends with ``suffix``, in step order, by tag."""
  from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
  scalars = {}
  for name in sorted(os.listdir(folder)):
    for event in LegacyEventFileLoader(os.path.join(folder, name)).Load():
      for value in event.summary.value:
        if value.tag.endswith(suffix):
          scalars.setdefault(value.tag, []).append(value.simple_value)
  return scalars


def test_policy_scalars_get_the_tag_tensorboard_would_make_without_a_log_line_each(tmp_path, caplog):
  board = report.TensorBoard(str(tmp_path))
  with caplog.at_level("INFO"):
    board.scalars(2, {"mean_r1": 41.5}, "eval_task_aware_no_reindex+shift/task_00")
  board.close()
  assert _logged_scalars(str(tmp_path), "mean_r1") == {"eval_task_aware_no_reindex_shift/task_00/mean_r1": [41.5]}
  assert not [r for r in caplog.records if "illegal" in r.getMessage()]


def test_an_unwritable_workdir_is_refused(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(experiment.UserError, match="cannot write to workdir"):
    experiment.run(tiny.get_config(), str(blocker / "sub"))


def _copy_without_last_evaluation(workdir: str, copy: str) -> None:
  """A copy of a finished run as if killed while evaluating task 1."""
  shutil.copytree(workdir, copy)
  manifest.remove_file(os.path.join(copy, "eval", "after_task_01.json"))
  manifest.remove_file(os.path.join(copy, "results.json"))


def test_allow_config_change_resumes_a_workdir_under_a_new_config(finished_run, tmp_path):
  workdir, results = finished_run
  copy = str(tmp_path / "copy")
  _copy_without_last_evaluation(workdir, copy)
  config = tiny.get_config()
  config.eval.batch_size = 32
  with pytest.raises(experiment.UserError, match="--allow_config_change"):
    experiment.run(config, copy)
  again = experiment.run(config, copy, allow_config_change=True)
  assert json.load(open(os.path.join(copy, "config.json")))["eval"]["batch_size"] == 32
  assert again["policies"] == results["policies"]


def test_a_full_disk_stops_with_a_message_and_leaves_no_partial_file(finished_run, tmp_path, monkeypatch):
  workdir, results = finished_run
  copy = str(tmp_path / "copy")
  _copy_without_last_evaluation(workdir, copy)

  calls = []

  def full_disk(fd):  # the workdir's write probe passes, then the disk is full
    calls.append(fd)
    if len(calls) > 1:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  with monkeypatch.context() as patch:
    patch.setattr(os, "fsync", full_disk)
    with pytest.raises(experiment.UserError, match=r"no space left on the device while writing .*\.npz; free space"):
      experiment.run(tiny.get_config(), copy)
  leftovers = [name for _, _, names in os.walk(copy) for name in names if name.startswith(".tmp_")]
  assert leftovers == [] and not os.path.exists(os.path.join(copy, "eval", "after_task_01.json"))
  assert experiment.run(tiny.get_config(), copy)["policies"] == results["policies"]


def test_a_diverged_loss_names_the_step_and_keeps_only_finite_checkpoints(tmp_path):
  config = tiny.get_config()
  config.train.learning_rate = 1e30
  config.train.log_every = 1
  config.train.checkpoint_every = 1
  workdir = str(tmp_path / "run")
  with pytest.raises(experiment.UserError, match=r"training diverged: .* at step \d+ of task 0; the checkpoints"):
    experiment.run(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "snapshots", "task_00"))
  progress = os.path.join(workdir, "progress", "task_00")
  kept = [name for name in os.listdir(progress) if name.startswith("step_")]
  assert kept, "the step before the divergence (warmup: lr 0 at step 1) must have been checkpointed"
  for name in kept:
    state = ocp.StandardCheckpointer().restore(os.path.join(progress, name))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state["params"]))


def test_a_corrupt_snapshot_stops_the_resumed_program_with_the_fix(finished_run, tmp_path):
  workdir, _ = finished_run
  copy = str(tmp_path / "copy")
  _copy_without_last_evaluation(workdir, copy)
  for root, _, names in os.walk(os.path.join(copy, "snapshots", "task_01")):
    for name in names:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(max(os.path.getsize(os.path.join(root, name)) // 3, 1))
  env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "ccmr_jax.main", "--config=configs/tiny.py", f"--workdir={copy}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert f"{copy}/snapshots/task_01 is damaged" in line and "--repair to retrain task 1" in line
  assert "Traceback" not in proc.stderr


def _sealed_as_is(path: str, images: np.ndarray) -> str:
  np.savez(path, images=images)
  manifest.seal(path)
  return path


def test_a_crafted_pickle_in_the_workdir_is_refused_not_run(finished_run, tmp_path):
  workdir, results = finished_run
  copy = str(tmp_path / "copy")
  _copy_without_last_evaluation(workdir, copy)
  marker = tmp_path / "executed"

  class Payload:
    def __reduce__(self):
      return (open, (str(marker), "w"))

  crafted = os.path.join(copy, "embeddings", "snapshot_00", "task_00.npz")
  np.savez(crafted, images=np.array([Payload()], dtype=object))
  assert experiment.run(tiny.get_config(), copy)["policies"] == results["policies"]  # seen damaged, recomputed
  assert not marker.exists()
  with pytest.raises(files.CorruptFileError, match=r"task_00.npz is not a readable .npz of plain arrays"):
    manifest.load_npz(_sealed_as_is(crafted, np.array([Payload()], dtype=object)))  # even under a valid manifest
  assert not marker.exists()


def test_reevaluate_scores_the_same_snapshots_on_another_split_without_training(finished_run, tmp_path):
  from ccmr_jax import reevaluate
  workdir, results = finished_run
  target = str(tmp_path / "val")
  config = reevaluate.prepare(workdir, target, "val")
  again = experiment.run(config, target)
  assert again["config"]["eval"]["split"] == "val" and again["tasks_trained"] == results["tasks_trained"]
  assert not os.path.exists(os.path.join(target, "progress"))  # nothing trained: every snapshot was there
  for policy in ("reindex", "no_reindex"):
    assert again["policies"][policy]["rsum"]["matrix"] != results["policies"][policy]["rsum"]["matrix"]
  # Evaluating the copied snapshots on the run's own split gives the run's numbers.
  same = str(tmp_path / "test")
  assert experiment.run(reevaluate.prepare(workdir, same, "test"), same)["policies"] == results["policies"]
  with pytest.raises(experiment.UserError, match="has no config.json"):
    reevaluate.prepare(str(tmp_path / "val" / "eval"), str(tmp_path / "x"), "val")
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  for name in ("config.json", "tokenizer.json"):
    for part in (name, name + manifest.SIDECAR_SUFFIX):
      shutil.copy(os.path.join(workdir, part), untrained / part)
  with pytest.raises(experiment.UserError, match="has no snapshot yet"):
    reevaluate.prepare(str(untrained), str(tmp_path / "x"), "val")
