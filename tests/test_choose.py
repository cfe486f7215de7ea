"""Choosing each strategy's setting on val, from hand-made one-task results."""

import json
import os
import subprocess
import sys

import pytest

from ccmr_jax import choose, manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(folder, name, strategy, finals, continual, split="val"):
  """A one-task run ``folder/name`` whose task-aware final mean R@1 is ``finals[policy]``."""
  results = {"config": {"train": {"strategy": strategy}, "eval": {"split": split}, "continual": continual},
             "tasks_trained": 1,
             "policies": {p: {"mean_r1": {"matrix": [[v]], "final_average": v}} for p, v in finals.items()}}
  manifest.write_json(os.path.join(folder, name, "results.json"), results)


def _continual(lwf_weight=1.0, ewc_strength=1000.0):
  return {"lwf": {"weight": lwf_weight, "temperature": 0.1}, "ewc": {"strength": ewc_strength}}


@pytest.fixture
def sweep(tmp_path):
  folder = str(tmp_path / "val")
  _write(folder, "finetune_seed=0", "finetune", {"reindex": 30.0, "no_reindex": 20.0}, _continual())
  # lwf at 0.3: c = (34 + 22)/2 = 28; at 3: seeds average (35 + 25)/2 = 30 and (33 + 25)/2 = 29 → 29.5
  _write(folder, "lwf_lwf.weight=0.3_seed=0", "lwf", {"reindex": 34.0, "no_reindex": 22.0}, _continual(0.3))
  _write(folder, "lwf_lwf.weight=3_seed=0", "lwf", {"reindex": 35.0, "no_reindex": 25.0}, _continual(3.0))
  _write(folder, "lwf_lwf.weight=3_seed=1", "lwf", {"reindex": 33.0, "no_reindex": 25.0}, _continual(3.0))
  # ewc: the higher reindex loses to the better mean of both policies
  _write(folder, "ewc_ewc.strength=100_seed=0", "ewc", {"reindex": 40.0, "no_reindex": 10.0},
         _continual(ewc_strength=100.0))
  _write(folder, "ewc_ewc.strength=1e+04_seed=0", "ewc", {"reindex": 32.0, "no_reindex": 24.0},
         _continual(ewc_strength=1e4))
  return folder


def test_each_strategy_keeps_its_best_mean_over_policies_and_seeds(sweep):
  found = {s.name: s for s in choose.settings(choose.compare.load_runs(choose.study.run_folders(sweep)))}
  assert found["lwf_lwf.weight=3"].criterion == pytest.approx(29.5) and len(found["lwf_lwf.weight=3"].runs) == 2
  assert found["lwf_lwf.weight=0.3"].criterion == pytest.approx(28.0)
  chosen = choose.choose(list(found.values()))
  assert chosen["lwf"] == {"setting": "lwf_lwf.weight=3", "criterion": pytest.approx(29.5),
                           "runs": ["lwf_lwf.weight=3_seed=0", "lwf_lwf.weight=3_seed=1"],
                           "overrides": {"continual.lwf.weight": 3.0}}
  assert chosen["ewc"]["setting"] == "ewc_ewc.strength=1e+04"
  assert chosen["ewc"]["overrides"] == {"continual.ewc.strength": 1e4}
  assert chosen["finetune"]["overrides"] == {}


def test_the_reindex_only_criterion_chooses_otherwise(sweep):
  runs = choose.compare.load_runs(choose.study.run_folders(sweep))
  chosen = choose.choose(choose.settings(runs, policies=["reindex"]))
  assert chosen["ewc"]["setting"] == "ewc_ewc.strength=100"
  assert chosen["lwf"]["setting"] == "lwf_lwf.weight=0.3"  # a tie, 34 = (35 + 33)/2: the first listed keeps it


def test_runs_on_test_and_missing_policies_are_refused(tmp_path, sweep):
  _write(sweep, "si_seed=0", "si", {"reindex": 1.0, "no_reindex": 1.0}, _continual(), split="test")
  with pytest.raises(choose.ChooseError, match="si_seed=0 was evaluated on 'test'; choose on runs evaluated on val"):
    choose.write_choice(sweep, str(tmp_path / "out"))
  with pytest.raises(choose.ChooseError, match="has no policy 'remap_linear'"):
    choose.settings(choose.compare.load_runs([os.path.join(sweep, "finetune_seed=0")]), ["remap_linear"])
  with pytest.raises(choose.ChooseError, match="--policies is empty"):
    choose.settings([], [])


def test_the_command_writes_the_table_and_the_overrides(sweep, tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "ccmr_jax.choose", f"--workdir={sweep}", f"--out={out}"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  table = (out / "choose.md").read_text()
  assert "| lwf | lwf_lwf.weight=3 | 2 | 34.00 | 25.00 | 29.50 | **yes** |" in table
  assert "| lwf | lwf_lwf.weight=0.3 | 1 | 34.00 | 22.00 | 28.00 |  |" in table
  assert json.loads((out / "chosen.json").read_text())["lwf"]["overrides"] == {"continual.lwf.weight": 3.0}
  missing = subprocess.run([sys.executable, "-m", "ccmr_jax.choose", f"--workdir={tmp_path / 'none'}",
                            f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert missing.returncode == 2 and "does not exist" in missing.stderr
