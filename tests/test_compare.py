"""Comparing runs from hand-made results.json files."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from ccmr_jax import compare, manifest, metrics, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = metrics.metric_names((1, 5, 10))


def _results(strategy, base, agnostic_base=None):
  """A results document of two tasks in which metric number i of R[t][k] is ``base[policy][t][k] + i``.

  Task-agnostic results come from ``agnostic_base``; without it the document has none, as older runs.
  """
  def per_policy(values, t):
    return {policy: {str(k): {m: values[policy][t][k] + i for i, m in enumerate(METRICS)} for k in range(t + 1)}
            for policy in values}

  evaluations = [{"task_aware": per_policy(base, t), "task_agnostic": per_policy(agnostic_base or base, t)}
                 for t in range(2)]
  run_info = {"config": {"data": {"source": "scenes"}, "train": {"strategy": strategy}},
              "tasks": [{"index": k, "name": f"t{k}", "categories": [], "counts": {}} for k in range(2)]}
  results = report.build_results(evaluations, METRICS, run_info)
  if agnostic_base is None:
    del results["policies_agnostic"]
  return results


# mean_r1 (metric 7) after task 1: reindex [30, 60] + 7, no_reindex [40, 60] + 7.
BASE = {"reindex": [[50], [30, 60]], "no_reindex": [[50], [40, 60]]}
AGNOSTIC = {"reindex": [[40], [20, 50]], "no_reindex": [[40], [30, 50]]}


@pytest.fixture
def workdirs(tmp_path):
  paths = []
  for name, results in (("a", _results("finetune", BASE)), ("b", _results("finetune", BASE, AGNOSTIC))):
    path = str(tmp_path / name)
    manifest.write_json(os.path.join(path, "results.json"), results)
    paths.append(path)
  return paths


def test_rows_hold_final_averages_forgetting_and_bwt(workdirs):
  rows = compare.comparison_rows(compare.load_runs(workdirs))
  assert [(r["run"], r["scope"], r["policy"]) for r in rows] == [
      ("finetune (a)", "task_aware", "reindex"), ("finetune (a)", "task_aware", "no_reindex"),
      ("finetune (b)", "task_aware", "reindex"), ("finetune (b)", "task_aware", "no_reindex"),
      ("finetune (b)", "task_agnostic", "reindex"), ("finetune (b)", "task_agnostic", "no_reindex")]
  reindex, no_reindex, agnostic = rows[0], rows[1], rows[4]
  assert reindex["i2t_r1"] == pytest.approx(45.0)  # (30 + 60) / 2 + 0
  assert reindex["t2i_r10"] == pytest.approx(50.0)  # + 5
  assert reindex["mean_r1"] == pytest.approx(52.0)  # + 7
  assert reindex["forgetting_mean_r1"] == pytest.approx(20.0) and reindex["bwt_mean_r1"] == pytest.approx(-20.0)
  assert no_reindex["mean_r1"] == pytest.approx(57.0)
  assert no_reindex["forgetting_mean_r1"] == pytest.approx(10.0)
  assert agnostic["mean_r1"] == pytest.approx(42.0) and agnostic["bwt_mean_r1"] == pytest.approx(-20.0)
  assert reindex["tasks_trained"] == 2 and reindex["workdir"] == workdirs[0]


def test_labels_are_strategies_unless_two_runs_share_one():
  runs = [compare.Run("x/one", _results("finetune", BASE)), compare.Run("x/two", _results("ewc", BASE)),
          compare.Run("y/two", _results("ewc", BASE))]
  assert compare.run_labels(runs) == ["finetune", "ewc (x/two)", "ewc (y/two)"]
  assert compare.run_labels(runs[:2]) == ["finetune", "ewc"]


def test_seen_task_average():
  assert compare.seen_task_average([[50, None], [30, 60]]) == [50.0, 45.0]


def test_write_comparison_writes_tables_and_plots(workdirs, tmp_path):
  out = str(tmp_path / "out")
  paths = compare.write_comparison(compare.load_runs(workdirs), out)
  assert [os.path.basename(p) for p in paths] == list(compare.OUTPUT_NAMES)
  with open(paths[1], newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6 and list(rows[0]) == list(compare.COLUMNS)
  assert float(rows[1]["mean_r1"]) == pytest.approx(57.0)
  markdown = open(paths[0]).read()
  assert "| finetune (a) | no_reindex | task_aware | 2 | 50.00 |" in markdown
  assert "compare_curves.png" in markdown
  for png in paths[2:4]:
    with open(png, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.listdir(out)) == sorted(compare.OUTPUT_NAMES)  # no temporary files left


def test_malformed_results_name_the_workdir(workdirs, tmp_path):
  broken = tmp_path / "broken"
  broken.mkdir()
  manifest.write_text(str(broken / "results.json"), "{not json")
  with pytest.raises(compare.CompareError, match=f"cannot read {broken}.*not valid JSON"):
    compare.load_run(str(broken))
  (broken / "results.json").write_text("{}")  # damaged after it was written: its manifest tells
  with pytest.raises(compare.CompareError, match=f"cannot read {broken}.*its manifest says"):
    compare.load_run(str(broken))
  manifest.write_json(str(broken / "results.json"), {"config": {"train": {"strategy": "x"}}, "tasks_trained": 1})
  with pytest.raises(compare.CompareError, match="malformed: it has no 'policies'"):
    compare.load_run(str(broken))
  with pytest.raises(compare.CompareError, match="given twice"):
    compare.load_runs([workdirs[0], workdirs[0] + "/"])


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "ccmr_jax.compare", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=120)


def test_the_command_refuses_a_workdir_without_results(workdirs, tmp_path):
  missing = str(tmp_path / "never_ran")
  proc = _cli(f"--workdirs={workdirs[0]},{missing}", f"--out={tmp_path / 'out'}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"error: workdir {missing} has no results.json" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_the_command_writes_the_comparison(workdirs, tmp_path):
  proc = _cli(f"--workdirs={','.join(workdirs)}", f"--out={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert os.path.isfile(tmp_path / "out" / "compare.md") and "wrote:" in proc.stdout


def test_replicates_differing_only_in_seed_and_task_order_are_averaged_with_their_spread(tmp_path):
  values = {0: 30.0, 1: 36.0, 2: 33.0}
  paths = []
  for seed, v in values.items():
    results = _results("finetune", {"reindex": [[50], [v, 60]], "no_reindex": [[50], [v - 10, 60]]})
    results["config"].update(seed=seed, data={"source": "scenes", "scenes": {"seed": seed}, "task_order": [seed]})
    results["zero_shot"] = {"mean_r1": [10.0 + seed, 20.0]}
    paths.append(str(tmp_path / f"finetune_seed={seed}"))
    manifest.write_json(os.path.join(paths[-1], "results.json"), results)
  other = _results("ewc", BASE)  # another strategy: its own group
  paths.append(str(tmp_path / "ewc"))
  manifest.write_json(os.path.join(paths[-1], "results.json"), other)
  runs = compare.load_runs(paths)
  rows = compare.aggregate_rows(runs, compare.comparison_rows(runs))
  assert [(r["group"], r["policy"], r["n"]) for r in rows] == [
      ("finetune", "reindex", 3), ("finetune", "no_reindex", 3), ("ewc", "reindex", 1), ("ewc", "no_reindex", 1)]
  finals = np.array([(v + 7 + 60 + 7) / 2 for v in values.values()])  # mean_r1 is metric 7: + 7
  assert rows[0]["mean_r1"] == pytest.approx(finals.mean())
  assert rows[0]["mean_r1_std"] == pytest.approx(finals.std(ddof=1))
  assert rows[1]["mean_r1"] == pytest.approx(finals.mean() - 5)
  assert rows[0]["zero_shot_mean_r1"] == pytest.approx(np.mean([(10 + s + 20) / 2 for s in values]))
  assert rows[2]["mean_r1_std"] == 0.0 and rows[2]["zero_shot_mean_r1"] is None
  written = compare.write_comparison(runs, str(tmp_path / "out"))
  table = open(written[4]).read()
  assert "| finetune | reindex | task_aware | 3 | " in table and f"{finals.mean():.2f} ± {finals.std(ddof=1):.2f}" in table
  with open(written[5]) as f:
    assert next(csv.DictReader(f))["mean_r1_std"] == str(rows[0]["mean_r1_std"])


def test_groups_of_the_same_name_are_told_apart_by_their_folder(tmp_path):
  paths = []
  for folder, strategy in (("pretrained", "finetune"), ("scratch", "joint")):
    for seed in (0, 1):
      results = _results(strategy, BASE)
      results["config"]["seed"] = seed
      paths.append(str(tmp_path / folder / f"finetune_seed={seed}"))
      manifest.write_json(os.path.join(paths[-1], "results.json"), results)
  runs = compare.load_runs(paths)
  groups = [(r["group"], r["n"]) for r in compare.aggregate_rows(runs, compare.comparison_rows(runs))]
  assert groups == [("pretrained/finetune", 2)] * 2 + [("scratch/finetune", 2)] * 2
