"""Strategy names → regularizers, importance estimates, replay and distillation switches."""

import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import optax
import pytest

from ccmr_jax.continual import EWCState, L2AnchorState, MASState, OnlineEWCState, SIState, penalty
from ccmr_jax import defaults
from ccmr_jax.continual.distillation import SIMILARITY_PARTS
from ccmr_jax.continual.regularizers import regularizer_specs
from ccmr_jax.continual.replay import SELECTIONS
from ccmr_jax.continual.strategies import (
    REGULARIZER_COMPONENTS,
    STRATEGY_COMPONENTS,
    Strategy,
    check_continual_config,
    continual_defaults,
    parse_strategy,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_with(**continual_overrides):
  config = ml_collections.ConfigDict({"continual": continual_defaults()})
  for path, value in continual_overrides.items():
    section, field = path.split("__")
    config.continual[section][field] = value
  return config


def params_like(seed):
  rng = np.random.default_rng(seed)
  return {"w": rng.standard_normal((3, 2)).astype(np.float32), "b": rng.standard_normal(2).astype(np.float32)}


def test_every_component_parses_alone_and_in_combinations():
  for component in STRATEGY_COMPONENTS:
    assert parse_strategy(component).name == component
  assert parse_strategy("replay + lwf").components == ("replay", "lwf")
  assert parse_strategy("ewc+mas+replay+lwf").name == "ewc+mas+replay+lwf"
  with pytest.raises(ValueError, match=r"unknown train.strategy component\(s\) \['icarl'\].*'online_ewc'"):
    parse_strategy("icarl+ewc")
  with pytest.raises(ValueError, match="names a component twice"):
    parse_strategy("ewc+ewc")
  for name in ("finetune+ewc", "joint+replay", "replay+finetune"):
    with pytest.raises(ValueError, match="stand alone"):
      parse_strategy(name)


@pytest.mark.parametrize("name, importance, replay, distillation, sections", [
    ("finetune", (), False, False, ()),
    ("joint", (), False, False, ()),
    ("l2", (), False, False, ("l2",)),
    ("ewc", ("fisher",), False, False, ("ewc", "importance")),
    ("online_ewc+ewc", ("fisher",), False, False, ("online_ewc", "ewc", "importance")),
    ("mas+ewc", ("fisher", "mas"), False, False, ("mas", "ewc", "importance")),
    ("si+replay", (), True, False, ("si", "replay")),
    ("replay+lwf", (), True, True, ("replay", "lwf")),
    ("bct", (), False, False, ("bct",)),
    ("ewc+bct", ("fisher",), False, False, ("ewc", "bct", "importance")),
])
def test_switches_of_a_strategy(name, importance, replay, distillation, sections):
  strategy = parse_strategy(name)
  assert strategy.needs_importance == importance
  assert strategy.uses_replay == replay and strategy.uses_distillation == distillation
  assert strategy.continual_sections == sections
  assert strategy.uses_compatibility == ("bct" in name)
  assert strategy.uses_teacher == (distillation or "bct" in name)


def test_training_tasks():
  assert parse_strategy("joint").training_tasks(2) == [0, 1, 2]
  assert parse_strategy("ewc+replay").training_tasks(2) == [2]


def test_regularizers_are_built_from_the_config_with_si_first():
  config = config_with(ewc__strength=7.0, si__strength=0.5, si__damping=0.25, online_ewc__decay=0.8)
  strategy = parse_strategy("ewc+l2+si+online_ewc+mas+replay")
  transforms = strategy.regularizers(config)
  states = [t.init(params_like(0)) for t in transforms]
  assert [type(s) for s in states] == [SIState, L2AnchorState, EWCState, OnlineEWCState, MASState]
  assert float(states[0].strength) == 0.5 and float(states[0].damping) == 0.25
  assert float(states[1].strength) == pytest.approx(0.1)
  assert float(states[2].strength) == 7.0 and float(states[3].decay) == pytest.approx(0.8)
  # Strategies without a regularizer do not need config.continual at all.
  for name in ("finetune", "joint", "replay+lwf"):
    assert parse_strategy(name).regularizers(ml_collections.ConfigDict()) == []
  with pytest.raises(ValueError, match="needs config.continual"):
    parse_strategy("ewc").regularizers(ml_collections.ConfigDict())
  with pytest.raises(ValueError, match="continual.ewc.strength must be a positive number, got -1.0"):
    parse_strategy("ewc").regularizers(config_with(ewc__strength=-1.0))


def test_defaults_are_valid_and_every_field_is_documented():
  assert continual_defaults is defaults.continual_defaults  # the re-export
  defaults_ = continual_defaults()
  check_continual_config(defaults_)
  doc = continual_defaults.__doc__
  for section, fields in defaults_.items():
    for field in fields:
      assert f"{section}.{field}" in doc


def test_every_regularizer_spec_has_its_defaults_section():
  defaults_ = continual_defaults()
  for spec in regularizer_specs():
    assert spec.name in defaults_, (f"regularizer {spec.name!r} has no section in "
                                    f"ccmr_jax.defaults.continual_defaults(); add continual.{spec.name}")
    for field, ok, requirement in spec.hyperparameters:
      assert field in defaults_[spec.name], f"continual_defaults() has no field {spec.name}.{field}"
      assert ok(defaults_[spec.name][field]), f"default {spec.name}.{field} is not {requirement}"


def test_default_literals_name_real_parts_and_selections():
  defaults_ = continual_defaults()
  assert tuple(defaults_.lwf.parts) == SIMILARITY_PARTS  # distill every part by default
  assert defaults_.replay.selection in SELECTIONS


def test_components_and_chain_order_come_from_the_specs():
  assert REGULARIZER_COMPONENTS == ("si", "l2", "ewc", "online_ewc", "mas")
  assert STRATEGY_COMPONENTS == ("finetune", "joint", "si", "l2", "ewc", "online_ewc", "mas", "lwf", "replay", "bct")
  strategy = parse_strategy("mas+replay+online_ewc+si+l2+ewc")
  assert strategy.regularizer_components == ("si", "l2", "ewc", "online_ewc", "mas")
  assert strategy.needs_importance == ("fisher", "mas")


def test_loading_a_config_imports_no_jax_optax_or_data():
  configs = sorted(name[:-3] for name in os.listdir(os.path.join(REPO, "configs"))
                   if name.endswith(".py") and name != "__init__.py")
  assert {"scenes", "tiny", "flickr", "coco"} <= set(configs)
  code = textwrap.dedent(f"""
      import importlib, sys
      for name in {configs!r}:
        importlib.import_module("configs." + name).get_config()
      print(sorted(m for m in sys.modules if m in ("jax", "optax") or m.startswith("ccmr_jax.data")))
  """)
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("path, value, message", [
    ("l2__strength", 0.0, "continual.l2.strength must be a positive number, got 0.0"),
    ("mas__strength", float("inf"), "continual.mas.strength must be a positive number"),
    ("si__damping", -0.1, "continual.si.damping must be a positive number"),
    ("online_ewc__decay", 1.5, r"continual.online_ewc.decay must be in \(0, 1\]"),
    ("lwf__temperature", 0.0, "continual.lwf.temperature must be a positive number"),
    ("lwf__parts", ("cross", "audio"), "continual.lwf.parts must be a non-empty selection"),
    ("lwf__parts", (), "continual.lwf.parts must be a non-empty selection"),
    ("replay__fraction", 1.0, r"continual.replay.fraction must be in \(0, 1\)"),
    ("replay__memory_per_task", 0, "continual.replay.memory_per_task must be a positive integer"),
    ("replay__selection", "fifo", r"unknown continual.replay.selection 'fifo'; choose one of \['reservoir'"),
    ("importance__max_batches", -2, "continual.importance.max_batches must be a positive integer"),
])
def test_bad_values_are_refused_naming_the_field(path, value, message):
  with pytest.raises(ValueError, match=message):
    check_continual_config(config_with(**{path: value}).continual)


def test_a_missing_field_is_named():
  continual = continual_defaults()
  del continual.replay["fraction"]
  with pytest.raises(ValueError, match="config.continual.replay.fraction is missing"):
    check_continual_config(continual)


def _optimizer_and_state(strategy: Strategy, params):
  optimizer = optax.chain(*strategy.regularizers(config_with(ewc__strength=3.0, mas__strength=2.0)))
  return optimizer, jax.jit(optimizer.init)(params)


def test_consolidate_gives_each_regularizer_its_own_importance_and_penalties_add():
  strategy = parse_strategy("ewc+mas+l2")
  anchor, fisher, omega, now, grads = (params_like(s) for s in range(5))
  fisher, omega = (jax.tree.map(np.abs, t) for t in (fisher, omega))
  optimizer, state = _optimizer_and_state(strategy, anchor)
  state = strategy.consolidate(state, anchor, {"fisher": fisher, "mas": omega})
  l2_state, ewc_state, mas_state = state
  for got, want in ((ewc_state.fisher_sum, fisher), (mas_state.importance, omega), (l2_state.anchor, anchor)):
    jax.tree.map(np.testing.assert_allclose, jax.tree.map(np.asarray, got), want)
  # Each penalty by hand (float64): s/2 sum w (theta - theta*)^2 with w = 1 (l2, default 0.1),
  # the Fisher (ewc, 3.0) and Omega (mas, 2.0), all anchored at `anchor`.
  wide = lambda tree: {k: np.asarray(v, np.float64) for k, v in tree.items()}
  diff = {k: wide(now)[k] - wide(anchor)[k] for k in now}
  weights = {"l2": (0.1, {k: np.ones_like(d) for k, d in diff.items()}), "ewc": (3.0, wide(fisher)),
             "mas": (2.0, wide(omega))}
  by_hand = {name: s / 2 * sum(np.sum(w[k] * diff[k]**2) for k in diff) for name, (s, w) in weights.items()}
  for name, reg_state in zip(("l2", "ewc", "mas"), state):
    assert float(penalty(reg_state, now)) == pytest.approx(by_hand[name], rel=1e-5), name
  assert float(penalty(state, now)) == pytest.approx(sum(by_hand.values()), rel=1e-5)
  # The chain adds the gradient of the sum, sum_r s_r w_r (theta - theta*), to the loss gradient.
  updates, _ = jax.jit(optimizer.update)(grads, state, now)
  for k in now:
    pull = sum(s * w[k] * diff[k] for s, w in weights.values())
    np.testing.assert_allclose(updates[k], grads[k] + pull, rtol=1e-5)


def test_consolidate_checks_importances_and_tolerates_strategies_without_regularizers():
  params = params_like(0)
  strategy = parse_strategy("ewc+mas")
  _, state = _optimizer_and_state(strategy, params)
  with pytest.raises(ValueError, match=r"needs the importance estimate\(s\) \['mas'\]"):
    strategy.consolidate(state, params, {"fisher": params})
  plain = optax.adam(1e-3)
  plain_state = plain.init(params)
  assert parse_strategy("replay+lwf").consolidate(plain_state, params) is plain_state
  with pytest.raises(ValueError, match="holds no regularizer state"):
    parse_strategy("l2").consolidate(plain_state, params)
