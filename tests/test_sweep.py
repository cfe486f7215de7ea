"""The sweep command: argument parsing, run naming, resuming; experiment.run is replaced by a stub."""

import json
import os

import pytest
from absl import flags

from ccmr_jax import experiment, manifest, metrics, policies, report, sweep
from ccmr_jax.continual.strategies import continual_defaults
from configs import tiny

METRICS = metrics.metric_names((1, 5, 10))
CONFIG_FILE = """
from ccmr_jax.continual.strategies import continual_defaults
from configs import tiny


def get_config():
  config = tiny.get_config()
  config.continual = continual_defaults()
  return config
"""


def base_config():
  config = tiny.get_config()
  config.continual = continual_defaults()
  return config


@pytest.fixture
def stub_runs(monkeypatch):
  """Replaces experiment.run by a stub that writes a one-task results.json; returns the calls."""
  calls = []

  def fake_run(config, workdir):
    calls.append((config, workdir))
    evaluation = {scope: {policy: {"0": {m: 50.0 for m in METRICS}} for policy in policies.POLICY_NAMES}
                  for scope in metrics.SCOPES}
    run_info = {"config": json.loads(config.to_json()), "tasks": [{"index": 0, "name": "t0", "categories": [],
                                                                    "counts": {}}]}
    os.makedirs(workdir, exist_ok=True)
    manifest.write_json(os.path.join(workdir, "results.json"), report.build_results([evaluation], METRICS, run_info))

  monkeypatch.setattr(experiment, "run", fake_run)
  return calls


def test_sweep_values_are_typed_like_the_field():
  continual = continual_defaults()
  assert sweep.parse_sweep("ewc.strength=1,10,1e2", continual) == sweep.SweptField("ewc.strength", (1.0, 10.0, 100.0))
  assert sweep.parse_sweep("replay.memory_per_task=50,100", continual).values == (50, 100)
  assert sweep.parse_sweep("replay.selection=reservoir,herding", continual).values == ("reservoir", "herding")
  assert sweep.parse_sweep("lwf.parts=cross,cross+image+text", continual).values == (
      ("cross",), ("cross", "image", "text"))
  for value, text in ((100.0, "100"), (0.25, "0.25"), (1e-5, "1e-05"), (50, "50"), (("cross", "text"), "cross+text")):
    assert sweep.format_value(value) == text


@pytest.mark.parametrize("text, message", [
    ("ewc.strength", "expected SECTION.FIELD=V1,V2"),
    ("strength=1,2", "expected SECTION.FIELD=V1,V2"),
    ("ewc.lambda=1", "config.continual has no field 'ewc.lambda'"),
    ("icarl.strength=1", "config.continual has no field 'icarl.strength'"),
    ("replay.memory_per_task=10,2.5", "'2.5' is not a int"),
    ("ewc.strength=1,one", "'one' is not a float"),
    ("ewc.strength=1,1.0", "names a value twice"),
])
def test_bad_sweeps_are_refused(text, message):
  with pytest.raises(ValueError, match=message):
    sweep.parse_sweep(text, continual_defaults())


def test_runs_are_named_by_strategy_and_the_swept_values_that_apply_to_it():
  continual = continual_defaults()
  sweeps = [sweep.parse_sweep("ewc.strength=10,100", continual),
            sweep.parse_sweep("replay.fraction=0.25,0.5", continual),
            sweep.parse_sweep("importance.max_batches=8", continual)]
  names = [r.name for r in sweep.plan_runs(["finetune", "ewc", "replay+lwf", "mas"], sweeps)]
  assert names == [
      "finetune",
      "ewc_ewc.strength=10_importance.max_batches=8", "ewc_ewc.strength=100_importance.max_batches=8",
      "replay+lwf_replay.fraction=0.25", "replay+lwf_replay.fraction=0.5",
      "mas_importance.max_batches=8",
  ]
  with pytest.raises(ValueError, match=r"applies to none of the strategies \['finetune', 'l2'\]"):
    sweep.plan_runs(["finetune", "l2"], sweeps[:1])
  with pytest.raises(ValueError, match="names a strategy twice"):
    sweep.plan_runs(["ewc", "ewc"], [])
  with pytest.raises(ValueError, match="names a field twice"):
    sweep.plan_runs(["ewc"], sweeps[:1] * 2)
  with pytest.raises(ValueError, match="unknown train.strategy"):
    sweep.plan_runs(["ewc", "bogus"], [])


def test_run_config_sets_strategy_swept_field_and_eval_split_on_a_copy():
  base = base_config()
  base.lock()
  planned = sweep.PlannedRun("ewc_ewc.strength=10", "ewc", (("ewc.strength", 10.0),))
  config = sweep.run_config(base, planned, "val")
  assert (config.train.strategy, config.continual.ewc.strength, config.eval.split) == ("ewc", 10.0, "val")
  assert base.train.strategy == "finetune" and base.eval.split == "test"
  with pytest.raises(ValueError, match="continual.ewc.strength must be a positive number"):
    sweep.run_config(base, sweep.PlannedRun("ewc", "ewc", (("ewc.strength", -1.0),)), None)


def test_seeds_replicate_every_run_and_set_both_seeds():
  names = [r.name for r in sweep.plan_runs(["finetune", "ewc"], [], seeds=[0, 2])]
  assert names == ["finetune_seed=0", "finetune_seed=2", "ewc_seed=0", "ewc_seed=2"]
  planned = sweep.plan_runs(["finetune"], [], seeds=[7])[0]
  config = sweep.run_config(base_config(), planned)
  assert (config.seed, config.data.scenes.seed) == (7, 7)
  assert sweep.run_config(base_config(), sweep.plan_runs(["finetune"], [])[0]).seed == base_config().seed
  with pytest.raises(ValueError, match="distinct whole numbers"):
    sweep.plan_runs(["finetune"], [], seeds=[1, 1])


def test_run_sweep_runs_each_planned_run_once_and_compares_them(tmp_path, stub_runs):
  workdir = str(tmp_path / "sweep")
  paths = sweep.run_sweep(base_config(), ["finetune", "ewc"], ["ewc.strength=1,10"], workdir, "val")
  assert [os.path.relpath(w, workdir) for _, w in stub_runs] == ["finetune", "ewc_ewc.strength=1",
                                                                  "ewc_ewc.strength=10"]
  assert [(c.train.strategy, c.continual.ewc.strength, c.eval.split) for c, _ in stub_runs] == [
      ("finetune", 1000.0, "val"), ("ewc", 1.0, "val"), ("ewc", 10.0, "val")]
  assert [os.path.basename(p) for p in paths][:2] == ["compare.md", "compare.csv"]
  with open(os.path.join(workdir, "compare.md")) as f:
    table = f.read()
  assert "ewc (ewc_ewc.strength=10)" in table and "| finetune |" in table
  # A rerun starts nothing that finished with the same config; another config's results are rerun.
  sweep.run_sweep(base_config(), ["finetune", "ewc"], ["ewc.strength=1,10"], workdir, "val")
  assert len(stub_runs) == 3
  sweep.run_sweep(base_config(), ["finetune"], [], workdir, "test")
  assert len(stub_runs) == 4


def test_invalid_sweeps_stop_before_any_run(tmp_path, stub_runs):
  with pytest.raises(experiment.UserError, match="continual.ewc.strength must be a positive number"):
    sweep.run_sweep(base_config(), ["finetune", "ewc"], ["ewc.strength=1,-1"], str(tmp_path), None)
  assert stub_runs == []


def _command(argv):
  flag_values = flags.FlagValues()
  sweep.define_flags(flag_values)
  remaining = flag_values(["sweep", *argv])
  sweep.main(remaining, flag_values)


def test_the_command_parses_its_flags(tmp_path, stub_runs, capsys):
  config_file = tmp_path / "config.py"
  config_file.write_text(CONFIG_FILE)
  workdir = tmp_path / "sweep"
  _command([f"--config={config_file}", "--strategies=finetune,replay+lwf", f"--workdir={workdir}",
            "--sweep=replay.fraction=0.25,0.5", "--sweep=lwf.temperature=0.05", "--eval_split=val"])
  assert sorted(os.path.basename(w) for _, w in stub_runs) == [
      "finetune", "replay+lwf_replay.fraction=0.25_lwf.temperature=0.05",
      "replay+lwf_replay.fraction=0.5_lwf.temperature=0.05"]
  assert [(c.eval.split, c.continual.lwf.temperature) for c, _ in stub_runs] == [("val", 0.1)] + [("val", 0.05)] * 2
  assert "wrote:" in capsys.readouterr().out and (workdir / "compare.csv").is_file()
  with pytest.raises(SystemExit) as exit_info:
    _command([f"--config={config_file}", "--strategies=ewc", f"--workdir={workdir}", "--sweep=ewc.strenght=1"])
  assert exit_info.value.code == 2
  assert "error: --sweep='ewc.strenght=1': config.continual has no field 'ewc.strenght'" in capsys.readouterr().err
  with pytest.raises(flags.IllegalFlagValueError):
    _command([f"--config={config_file}", "--strategies=ewc", f"--workdir={workdir}", "--eval_split=train"])
