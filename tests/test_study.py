"""The study over seeded cells, from hand-made results.json files."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from ccmr_jax import manifest, metrics, report, study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = metrics.metric_names((1, 5, 10))


def _results(final_row, drift=(0.8, 0.9), seed=0):
  """Two tasks; every metric of policy p after task 1 is ``final_row[p]`` on both tasks (so its final average).

  After task 0 every metric is 50. ``drift`` gives the images' and captions' mean cosine to the final snapshot.
  """
  evaluations = []
  for t in range(2):
    aware = {p: {str(k): {m: (50.0 if t == 0 else value) for m in METRICS} for k in range(t + 1)}
             for p, value in final_row.items()}
    agnostic = {p: {k: {m: v - 1.0 for m, v in per.items()} for k, per in tasks.items()}
                for p, tasks in aware.items()}
    evaluations.append({"task_aware": aware, "task_agnostic": agnostic})
  run_info = {"config": {"seed": seed, "data": {"source": "scenes"}, "train": {"strategy": "finetune"}},
              "tasks": [{"index": k, "name": f"t{k}", "categories": [], "counts": {}} for k in range(2)]}
  results = report.build_results(evaluations, METRICS, run_info)
  results["analysis_summary"] = {
      "drift_to_final": {"images": {"mean_cosine": drift[0]}, "captions": {"mean_cosine": drift[1]}},
      "final_matched_cosine": {p: {"i2t": 0.5 + 0.01 * i, "t2i": 0.5} for i, p in enumerate(final_row)}}
  return results


def _write_cell(folder, finals, drifts):
  """A sweep folder with one run per seed: ``finals[s]`` = {policy: final}, ``drifts[s]`` = (images, captions)."""
  for seed, (final_row, drift) in enumerate(zip(finals, drifts)):
    results = _results(final_row, drift, seed)
    manifest.write_json(os.path.join(folder, f"finetune_seed={seed}", "results.json"), results)
  return str(folder)


FINALS = [{"reindex": 30.0, "no_reindex": 28.0, "no_reindex+shift": 29.0},
          {"reindex": 40.0, "no_reindex": 37.0, "no_reindex+shift": 39.0},
          {"reindex": 50.0, "no_reindex": 49.0, "no_reindex+shift": 49.5}]
DRIFTS = [(0.8, 0.9), (0.7, 0.9), (0.9, 0.9)]


@pytest.fixture
def cells(tmp_path):
  default = _write_cell(tmp_path / "default", FINALS, DRIFTS)
  frozen = _write_cell(tmp_path / "frozen", [{"reindex": 30.0, "no_reindex": 31.0}, {"reindex": 32.0,
                                                                                    "no_reindex": 33.5}],
                       [(1.0, 0.96), (1.0, 0.98)])
  return study.load_cells([f"default={default}", f"frozen={frozen}"])


def test_a_cell_averages_its_seeds_and_pairs_the_differences(cells):
  rows = {(r["scope"], r["policy"]): r for r in study.cell_rows(cells[0])}
  re, no = rows["task_aware", "reindex"], rows["task_aware", "no_reindex"]
  assert re["n"] == 3 and re["mean_r1"] == pytest.approx(40.0) and re["mean_r1_std"] == pytest.approx(10.0)
  # per seed no − re = -2, -3, -1: the pairing removes the seeds' shared spread of 10
  assert no["minus_reindex"] == pytest.approx(-2.0) and no["minus_reindex_std"] == pytest.approx(1.0)
  assert re["minus_reindex"] == 0.0 and re["minus_reindex_std"] == 0.0
  assert rows["task_agnostic", "no_reindex"]["mean_r1"] == pytest.approx(37.0)  # every value − 1
  assert re["forgetting_mean_r1"] == pytest.approx(10.0)  # 50 → 40 on task 0
  assert re["drift_images"] == pytest.approx(0.8) and re["drift_images_std"] == pytest.approx(0.1)
  assert no["matched_cosine_i2t"] == pytest.approx(0.51)


def test_drift_points_and_the_fitted_lines(cells):
  points = study.drift_points(cells)
  assert [p.cell for p in points] == ["default"] * 3 + ["frozen"] * 2
  assert points[0].drift("mean drift") == pytest.approx(0.15) and points[0].drift("smaller drift") == pytest.approx(0.1)
  assert points[0].gain["task_aware"] == pytest.approx(-2.0)
  assert points[3].drift("smaller drift") == 0.0 and points[3].gain["task_agnostic"] == pytest.approx(1.0)
  fits = study.drift_fits(points)
  assert set(fits) == {(p, s, u) for p in study.PREDICTORS for s in ("task_aware", "task_agnostic")
                       for u in ("points", "percent")}
  y = np.array([p.gain["task_aware"] for p in points])
  relative = 100 * y / np.array([p.reindex["task_aware"] for p in points])
  assert points[0].relative_gain("task_aware") == pytest.approx(100 * -2.0 / 30.0)
  for predictor in study.PREDICTORS:
    x = [p.drift(predictor) for p in points]
    for unit, values in (("points", y), ("percent", relative)):
      slope, intercept = np.polyfit(x, values, 1)
      fit = fits[predictor, "task_aware", unit]
      assert (fit.slope, fit.intercept) == pytest.approx((slope, intercept)) and fit.n == 5
      assert 0.0 < fit.r_squared < 1.0
  only_default = study.drift_fits(points, fit_cells=["default"])["mean drift", "task_aware", "points"]
  slope, intercept = np.polyfit([p.drift("mean drift") for p in points[:3]], y[:3], 1)
  assert only_default.n == 3 and (only_default.slope, only_default.intercept) == pytest.approx((slope, intercept))


def test_fit_line_recovers_an_exact_line_and_refuses_too_few_points():
  fit = study.fit_line([0.0, 0.1, 0.3, 0.4], [1.0, 0.0, -2.0, -3.0])
  assert (fit.intercept, fit.slope, fit.r_squared) == pytest.approx((1.0, -10.0, 1.0))
  assert study.fit_line([0.1, 0.2], [1.0, 2.0]) is None
  assert study.fit_line([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]) is None


def test_write_study_writes_the_tables_and_the_plot(cells, tmp_path):
  paths = study.write_study(cells, str(tmp_path / "out"))
  assert [os.path.basename(p) for p in paths] == list(study.OUTPUT_NAMES)
  markdown = open(paths[0]).read()
  assert ("| default | task_aware | 3 | 40.00 ± 10.00 | 38.00 ± 10.54 | -2.00 ± 1.00 | "
          "`no_reindex+shift`: 39.17 ± 10.25, -0.83 ± 0.29 |") in markdown
  assert "| frozen | task_aware | 2 | 31.00 ± 1.41 | 32.25 ± 1.77 | 1.25 ± 0.35 | — |" in markdown
  assert "- task_aware, smaller drift: g ≈" in markdown and "over 5 runs" in markdown
  # δ, δ_min, then g and 100 g / reindex per scope (task-agnostic finals are all 1 lower)
  assert ("| frozen | 2 | 0.02 ± 0.01 | 0.00 ± 0.00 | 1.25 ± 0.35 | 4.01 ± 0.96 | 1.25 ± 0.35 | 4.14 ± 0.98 |"
          in markdown)
  with open(paths[1], newline="") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == list(study.CSV_COLUMNS) and len(rows) == 3 * 2 + 2 * 2
  with open(paths[2], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(paths[3], newline="") as f:
    points = list(csv.DictReader(f))
  assert len(points) == 5 and float(points[1]["cos_images"]) == 0.7 and float(points[1]["gain_task_aware"]) == -3.0
  assert float(points[1]["reindex_task_agnostic"]) == 39.0


def test_fit_cells_must_be_cells(cells, tmp_path):
  with pytest.raises(study.StudyError, match=r"--fit_cells names \['nope'\]"):
    study.write_study(cells, str(tmp_path / "out"), fit_cells=["default", "nope"])
  assert not (tmp_path / "out").exists()
  paths = study.write_study(cells, str(tmp_path / "out"), fit_cells=["default"])
  assert "over the runs of default:" in open(paths[0]).read()


def test_the_baseline_pairs_cells_by_seed_and_calls_a_gain_only_beyond_both_spreads(cells, tmp_path):
  # reindex 15 above default's in every seed (a gain beyond both stds of 10); no_reindex 5 above (within 10.54)
  strong = _write_cell(tmp_path / "strong", [{"reindex": f["reindex"] + 15.0, "no_reindex": f["no_reindex"] + 5.0}
                                             for f in FINALS], DRIFTS)
  cells = [*cells, *study.load_cells([f"strong={strong}"])]
  rows = [row for cell in cells for row in study.cell_rows(cell)]
  compared = {(r["cell"], r["scope"], r["policy"]): r for r in study.add_baseline_columns(cells, rows, "default")}
  gain, within = compared["strong", "task_aware", "reindex"], compared["strong", "task_aware", "no_reindex"]
  assert gain["minus_baseline"] == pytest.approx(15.0) and gain["minus_baseline_std"] == pytest.approx(0.0)
  assert gain["versus_baseline"] == "gain" and within["versus_baseline"] == "within spread"
  # frozen ran seeds 0 and 1: reindex 30 − 30 and 32 − 40 → −4 ± 5.66, inside default's std of 10
  frozen = compared["frozen", "task_aware", "reindex"]
  assert frozen["minus_baseline"] == pytest.approx(-4.0) and frozen["minus_baseline_std"] == pytest.approx(32 ** 0.5)
  assert frozen["versus_baseline"] == "within spread"
  assert compared["default", "task_aware", "reindex"]["minus_baseline"] is None
  assert compared["default", "task_aware", "no_reindex+shift"]["versus_baseline"] == ""
  paths = study.write_study(cells, str(tmp_path / "out"), baseline="default")
  assert ("| strong | task_aware | 3 | 55.00 ± 10.00 | 15.00 ± 0.00 | gain | 43.00 ± 10.54 | 5.00 ± 0.00 | "
          "within spread |") in open(paths[0]).read()
  with open(paths[1], newline="") as f:
    assert list(next(csv.DictReader(f))) == list(study.CSV_COLUMNS + study.BASELINE_COLUMNS)


def test_verdict_needs_two_seeds_a_side_and_a_difference_beyond_both_stds():
  assert study.verdict(-3.0, 1.0, 2.0, 3, 3) == "loss"
  assert study.verdict(3.0, 1.0, 3.0, 3, 3) == "within spread"
  assert study.verdict(30.0, 0.0, 0.0, 1, 3) == "one seed: no verdict"


def test_the_baseline_must_be_a_cell_with_one_run_per_seed(cells, tmp_path):
  rows = [row for cell in cells for row in study.cell_rows(cell)]
  with pytest.raises(study.StudyError, match="--baseline names 'nope', which is not a cell"):
    study.add_baseline_columns(cells, rows, "nope")
  twice = tmp_path / "twice"
  for name in ("a", "b"):
    manifest.write_json(str(twice / name / "results.json"), _results(FINALS[0], seed=4))
  cells = [*cells, *study.load_cells([f"twice={twice}"])]
  with pytest.raises(study.StudyError, match="repeats seed 4; --baseline pairs"):
    study.add_baseline_columns(cells, rows, "default")


def test_a_single_run_is_a_cell_of_one(tmp_path):
  folder = _write_cell(tmp_path / "one", FINALS[:1], DRIFTS[:1])
  cell = study.load_cells([f"one={folder}/finetune_seed=0"])[0]
  row = study.cell_rows(cell)[1]
  assert row["n"] == 1 and row["minus_reindex"] == pytest.approx(-2.0) and row["minus_reindex_std"] == 0.0


@pytest.mark.parametrize("spec, message", [
    ("nolabel", "should be LABEL=DIR"),
    ("a={missing}", "does not exist"),
    ("a={empty}", "holds no finished run"),
])
def test_bad_cells_are_refused_with_what_to_fix(tmp_path, spec, message):
  (tmp_path / "empty").mkdir()
  spec = spec.format(missing=tmp_path / "missing", empty=tmp_path / "empty")
  with pytest.raises(study.StudyError, match=message):
    study.load_cells([spec])
  with pytest.raises(study.StudyError, match="given twice"):
    study.parse_cells(["a=x", "a=y"])


def test_the_command_exits_2_on_a_malformed_run(tmp_path, cells):
  broken = tmp_path / "broken" / "finetune_seed=0"
  manifest.write_json(str(broken / "results.json"), {"config": {}})
  proc = subprocess.run([sys.executable, "-m", "ccmr_jax.study", f"--cells=b={tmp_path / 'broken'}",
                         f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "config.train.strategy is missing" in proc.stderr, proc.stderr[-2000:]
  ok = subprocess.run([sys.executable, "-m", "ccmr_jax.study", f"--cells=d={tmp_path / 'default'}",
                       f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert ok.returncode == 0 and sorted(os.listdir(tmp_path / "out")) == sorted(study.OUTPUT_NAMES), ok.stderr
  (tmp_path / "a_file").write_text("")
  unwritable = subprocess.run([sys.executable, "-m", "ccmr_jax.study", f"--cells=d={tmp_path / 'default'}",
                               f"--out={tmp_path / 'a_file' / 'out'}"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
  assert unwritable.returncode == 2 and f"cannot write to --out={tmp_path / 'a_file' / 'out'}" in unwritable.stderr
