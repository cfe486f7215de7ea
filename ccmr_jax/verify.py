"""``python -m ccmr_jax.verify --workdir=DIR``: checks every artifact of a workdir against its manifest.

Lists each artifact that is damaged, unsealed (an interrupted write) or
missing, whether a rerun recomputes it or it needs training, and what a rerun
of the same command would do (the plan of :mod:`ccmr_jax.integrity`, read
from the workdir's own ``config.json``). It changes nothing. Exit status: 0
when every artifact is sound, 1 when a rerun has something to repair, 2 for
a usage error (no such workdir, an unreadable ``config.json``).

``--seal`` records manifests for the artifacts that have none, trusting them
as they are: for a workdir written by a ccmr_jax that predates manifests.
Damaged artifacts are left alone.

Works on local and ``gs://`` workdirs.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import ml_collections
from absl import flags

from ccmr_jax import cli, files, integrity, manifest
from ccmr_jax import workdir as layout
from ccmr_jax.continual.strategies import parse_strategy



def _run_config(workdir: str) -> ml_collections.ConfigDict:
  path = layout.config_path(workdir)
  try:
    return ml_collections.ConfigDict(manifest.read_json(path))
  except (FileNotFoundError, files.CorruptFileError) as e:
    raise cli.UserError(f"{e}; verify needs the run's config.json to tell what a rerun would do") from e


def _rerun_lines(plan: integrity.Plan, prefix: str) -> list[str]:
  lines = [f"{prefix}: {note}" for note in plan.notes]
  if plan.train:
    lines.append(f"{prefix} train tasks {plan.train}")
  if plan.delete:
    lines.append(f"{prefix} delete {len(plan.delete)} artifacts first and resume at task {plan.resume}")
  return lines


def describe(findings: list[integrity.Finding], plan: integrity.Plan, repair_plan: integrity.Plan) -> list[str]:
  """The report's lines: one per artifact that is not sound, then what a rerun does (and with ``--repair``)."""
  lines = []
  for f in (f for f in findings if f.status != "sound"):
    sort = "trained" if f.artifact.kind in integrity.TRAINED else "recomputed by a rerun"
    lines.append(f"{f.status:9s} {f.artifact.kind:12s} {f.artifact.relative}  ({sort}): {f.problem}")
  if not plan.blocked:
    return lines + _rerun_lines(plan, "a rerun would")
  lines += [f"stops a rerun: {line}" for line in plan.blocked]
  return lines + (_rerun_lines(repair_plan, "with --repair, a rerun would") if not repair_plan.blocked else [])


def seal_unsealed(workdir: str, findings: list[integrity.Finding]) -> list[str]:
  """Writes a manifest for every unsealed artifact; returns their paths."""
  sealed = []
  for f in (f for f in findings if f.status == "unsealed"):
    manifest.seal(os.path.join(workdir, f.artifact.relative))
    sealed.append(f.artifact.relative)
  return sealed


@cli.exits_on_user_error()
def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  workdir = flags.FLAGS.workdir
  if not files.is_dir(workdir):
    raise cli.UserError(f"no workdir at {workdir}")
  start = time.perf_counter()
  findings = integrity.scan(workdir)
  if flags.FLAGS.seal:
    sealed = seal_unsealed(workdir, findings)
    print(f"sealed {len(sealed)} artifacts" + "".join(f"\n  {relative}" for relative in sealed))
    findings = integrity.scan(workdir)
  config = _run_config(workdir)
  plans = [integrity.plan_rerun(workdir, findings, config.data.num_tasks,
                                integrity.carried_kinds(parse_strategy(config.train.strategy)), repair)
           for repair in (False, True)]
  lines = describe(findings, *plans)
  sound = sum(f.status == "sound" for f in findings)
  print("\n".join(lines) if lines else "every artifact matches its manifest")
  print(f"{sound} of {len(findings)} artifacts sound; checked in {time.perf_counter() - start:.2f} s")
  raise SystemExit(0 if sound == len(findings) else 1)


if __name__ == "__main__":  # the flags exist only in the command
  flags.DEFINE_string("workdir", None, "The workdir to check (local folder or gs:// prefix).", required=True)
  flags.DEFINE_bool("seal", False, "Record manifests for artifacts that have none (a workdir made before "
                    "manifests), trusting them as they are.")
  cli.run(main)
