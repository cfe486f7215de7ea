"""A workdir's artifacts checked against their manifests, and what a rerun must redo to repair them.

Every artifact (see :mod:`ccmr_jax.manifest`) is one of two sorts:

* **computed** from others without training: the tokenizer (from task 0's
  captions or the pretrained card), the zero-shot row, and everything an
  evaluation writes — ``eval/after_task_TT.json``, the embeddings and
  indexes of snapshot ``t``, the drift maps, the union and moved-gallery
  indexes after task ``t``, task ``t``'s gallery metadata — and
  ``results.json``. A damaged one is deleted and recomputed: the rerun
  resumes at the evaluation that wrote it (re-evaluating from there reads
  only snapshots, which are intact), so the numbers come out the same.
* **trained**: snapshots, regularizer states, replay memories, progress
  checkpoints. They cannot be recomputed without retraining. A damaged one
  stops the rerun with one line naming it, unless ``--repair`` is given:
  then task ``t``'s trained state is deleted and task ``t`` retrained from
  ``S_{t-1}`` (training is a deterministic function of the config, so
  ``S_t`` comes back bit for bit).

An artifact without its manifest is an interrupted write: it counts as
absent. A task without a snapshot is (re)trained; a task that trains needs
the previous task's snapshot and, per strategy, its regularizer state and
replay memory — when those are absent that task is retrained first.
"""

from __future__ import annotations

import dataclasses
import os
import re

from ccmr_jax import files, manifest, policies
from ccmr_jax import workdir as layout

# Each kind: a pattern of paths relative to the workdir (group 1: the task whose training or evaluation wrote it).
PATTERNS = {
    "config": r"config\.json",
    "tokenizer": r"tokenizer\.json",
    "zero_shot": r"eval/zero_shot\.json",
    "evaluation": r"eval/after_task_(\d+)\.json",
    "results": r"results\.json",
    "snapshot": r"snapshots/task_(\d+)",
    "regularizers": r"continual/task_(\d+)/regularizers",
    "replay": r"continual/task_(\d+)/replay\.npz",
    "progress": r"progress/task_(\d+)/step_\d+",
    "embeddings": r"embeddings/snapshot_(\d+)/task_\d+\.npz",
    "gallery": r"galleries/task_(\d+)\.json",
    "index": r"index/snapshot_(\d+)/task_\d+/(?:images|captions)",
    "union_index": r"index/union/[^/]+/after_task_(\d+)/(?:images|captions)",
    "mapped_index": r"index/mapped/[^/]+/after_task_(\d+)/task_\d+/(?:images|captions)",
    "drift_maps": r"maps/after_task_(\d+)\.npz",
}
TRAINED = ("snapshot", "regularizers", "replay", "progress")
_COMPILED = {kind: re.compile(pattern + r"$") for kind, pattern in PATTERNS.items()}


@dataclasses.dataclass(frozen=True)
class Artifact:
  kind: str
  relative: str  # its path inside the workdir
  task: int | None  # the task whose training or evaluation wrote it (None: written once per run)


@dataclasses.dataclass(frozen=True)
class Finding:
  artifact: Artifact
  status: str  # "sound", "damaged", "unsealed" (no manifest: an interrupted write) or "missing"
  problem: str = ""


def _classify(relative: str) -> Artifact | None:
  for kind, pattern in _COMPILED.items():
    match = pattern.match(relative)
    if match:
      return Artifact(kind, relative, int(match.group(1)) if match.groups() else None)
  return None


def _walk(workdir: str, relative: str = "") -> list[Artifact]:
  """Every artifact under ``workdir/relative``; a file's manifest stands for the file when the file is gone."""
  found = {}
  for name in files.listdir(os.path.join(workdir, relative)):
    path = f"{relative}/{name}" if relative else name
    artifact = _classify(path.removesuffix(manifest.SIDECAR_SUFFIX))
    if artifact is not None:
      found[artifact.relative] = artifact
    elif files.is_dir(os.path.join(workdir, path)):
      found.update({a.relative: a for a in _walk(workdir, path)})
  return list(found.values())


def _check(workdir: str, artifact: Artifact) -> Finding:
  path = os.path.join(workdir, artifact.relative)
  if not manifest.is_sealed(path):
    return Finding(artifact, "unsealed", "no manifest: its write was interrupted")
  try:
    manifest.check(path)
  except manifest.DamagedError as e:
    return Finding(artifact, "damaged", e.problem)
  except FileNotFoundError as e:
    return Finding(artifact, "damaged", str(e))
  return Finding(artifact, "sound")


def _expected_outputs(t: int) -> list[Artifact]:
  """What evaluating ``S_t`` writes besides its JSON: task t's gallery, embeddings and indexes of tasks 0..t,
  the union indexes."""
  out = [Artifact("gallery", f"galleries/task_{t:02d}.json", t)]
  for k in range(t + 1):
    out.append(Artifact("embeddings", f"embeddings/snapshot_{t:02d}/task_{k:02d}.npz", t))
    out += [Artifact("index", f"index/snapshot_{t:02d}/task_{k:02d}/{g}", t) for g in layout.GALLERIES]
  out += [Artifact("union_index", f"index/union/{p}/after_task_{t:02d}/{g}", t)
          for p in policies.POLICY_NAMES if policies.get(p).query_map is None for g in layout.GALLERIES]
  out += [Artifact("mapped_index", f"index/mapped/{p}/after_task_{t:02d}/task_{k:02d}/{g}", t)
          for p in policies.POLICY_NAMES for k in range(t) if policies.get(p).moves_gallery(k, t)
          for g in layout.GALLERIES]
  if t > 0 and policies.maps_needed():
    out.append(Artifact("drift_maps", f"maps/after_task_{t:02d}.npz", t))
  return out


def scan(workdir: str) -> list[Finding]:
  """Every artifact of ``workdir`` checked, plus the outputs a sound evaluation implies but that are missing."""
  if not files.is_dir(workdir):
    return []
  findings = [_check(workdir, a) for a in sorted(_walk(workdir), key=lambda a: a.relative)]
  present = {f.artifact.relative for f in findings}
  evaluated = [f.artifact.task for f in findings if f.artifact.kind == "evaluation" and f.status == "sound"]
  for t in evaluated:
    findings += [Finding(a, "missing", "absent, though the evaluation after task "
                                       f"{t} wrote it") for a in _expected_outputs(t) if a.relative not in present]
  return findings


def carried_kinds(strategy) -> tuple[str, ...]:
  """The trained kinds a finished task hands the next under ``strategy`` (a :class:`~ccmr_jax.continual.strategies.Strategy`)."""
  return (("snapshot",) + (("regularizers",) if strategy.regularizer_components else ())
          + (("replay",) if strategy.uses_replay else ()))


@dataclasses.dataclass
class Plan:
  """What a rerun does about a workdir's findings, before it trains or evaluates anything.

  Attributes:
    resume: the first task the rerun trains or evaluates again (``num_tasks``: none).
    train: the tasks it trains (again, for those it had trained before), sorted.
    delete: the artifacts (paths inside the workdir) it deletes first, in order.
    notes: one line per repair, for the log.
    blocked: one line per artifact that stops the rerun (damaged and not recomputable).
  """

  resume: int
  train: list[int]
  delete: list[str]
  notes: list[str]
  blocked: list[str]


def _blocked_line(workdir: str, finding: Finding) -> str:
  a = finding.artifact
  path = os.path.join(workdir, a.relative)
  if a.kind == "config" and finding.status == "unsealed":
    return (f"{path} has no manifest: this workdir was written by a ccmr_jax that did not record checksums; "
            f"`python -m ccmr_jax.verify --workdir={workdir} --seal` trusts its files as they are")
  if a.kind == "config":
    return (f"{path} is damaged ({finding.problem}): the run's config is unknown. If this command's config is the "
            f"run's, delete {path} and {manifest.sidecar(path)} and rerun")
  redo = (f"restart task {a.task} from its beginning" if a.kind == "progress"
          else f"retrain task {a.task} from the snapshot before it")
  return (f"{path} is damaged ({finding.problem}) and cannot be recomputed without training: rerun with --repair "
          f"to {redo}, or restore it from a backup")


def _trained_group(sound: dict, task: int) -> list[str]:
  """The sound trained artifacts of ``task`` that closing it writes (snapshot, regularizers, replay)."""
  return [sound[kind, task] for kind in ("snapshot", "regularizers", "replay") if (kind, task) in sound]


def _close_carried_gaps(trains: set[int], sound: dict, carried_kinds: tuple[str, ...], notes: list[str]) -> None:
  """Adds to ``trains`` every task whose handed-on state a training task needs but that is not all sound."""
  changed = True
  while changed:
    changed = False
    for t in sorted(trains):
      missing = [kind for kind in carried_kinds if (kind, t - 1) not in sound]
      if t > 0 and t - 1 not in trains and missing:
        trains.add(t - 1)
        changed = True
        notes.append(f"task {t} trains from task {t - 1}'s state, whose {', '.join(missing)} is absent: "
                     f"retraining task {t - 1} as well")


def plan_rerun(workdir: str, findings: list[Finding], num_tasks: int, carried_kinds: tuple[str, ...],
               repair: bool) -> Plan:
  """The deletions, retraining and resume point that repair ``findings`` (see the module docstring).

  Args:
    workdir: the workdir the findings are of (for the messages).
    findings: from :func:`scan`.
    num_tasks: the run's number of tasks.
    carried_kinds: the trained kinds a task hands the next: ``snapshot`` and, per strategy,
      ``regularizers`` and ``replay``.
    repair: whether damaged trained artifacts are deleted and retrained (``--repair``) or stop the rerun.
  """
  delete, notes, blocked, forced = [], [], [], set()
  resume = num_tasks
  for f in (f for f in findings if f.status != "sound"):
    a, path = f.artifact, os.path.join(workdir, f.artifact.relative)
    if a.kind == "config" and f.status == "unsealed" and len(findings) == 1:
      delete.append(a.relative)  # killed right after writing it: the workdir holds nothing else yet
    elif a.kind == "config" or (a.kind in TRAINED and f.status == "damaged" and not repair):
      blocked.append(_blocked_line(workdir, f))
    elif a.kind in TRAINED:
      delete.append(a.relative)
      if f.status == "damaged":
        notes.append(f"{path} is damaged ({f.problem}): deleted, task {a.task} "
                     + ("restarts from its beginning" if a.kind == "progress" else "is retrained"))
        forced |= {a.task} if a.kind != "progress" else set()
    else:
      delete += [a.relative] if f.status != "missing" else []
      resume = min(resume, a.task if a.task is not None else num_tasks)
      notes.append(f"{path}: {f.problem}; recomputed"
                   + (f" by evaluating again from task {a.task}" if a.task is not None else ""))
  sound_trained = {(f.artifact.kind, f.artifact.task): f.artifact.relative for f in findings
                   if f.status == "sound" and f.artifact.kind in TRAINED}
  sound = {key: relative for key, relative in sound_trained.items() if key[1] not in forced}
  trains = {t for t in range(num_tasks) if ("snapshot", t) not in sound} | forced
  _close_carried_gaps(trains, sound, carried_kinds, notes)
  evaluated = sorted(f.artifact.task for f in findings if f.artifact.kind == "evaluation" and f.status == "sound")
  first_unevaluated = next((t for t in range(num_tasks) if t not in evaluated), num_tasks)
  resume = min([resume, first_unevaluated, *trains])
  for t in sorted(trains):
    delete += [relative for relative in _trained_group(sound_trained, t) if relative not in delete]
  stale = [layout.evaluation_path("", t) for t in sorted(evaluated, reverse=True) if t >= resume]
  return Plan(resume, sorted(trains), stale + [d for d in delete if d not in stale], notes, blocked)


def apply(workdir: str, plan: Plan) -> None:
  """Deletes ``plan.delete`` in order (each artifact's manifest first)."""
  for relative in plan.delete:
    manifest.remove(os.path.join(workdir, relative))
