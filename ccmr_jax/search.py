"""The querying stage as a tool: search a finished run with a typed caption or an image.

  python -m ccmr_jax.search --workdir=runs/default --text="a small red circle left of a blue box"
  python -m ccmr_jax.search --workdir=runs/default --image_id=20000003 --after_task=0 --out=grid.png

A query is embedded by the snapshot ``S_t`` of ``--after_task=t`` (the
current encoders, as in the paper) and searched in the ScaNN indexes the run
stored, as each indexing policy names them: task-aware in task ``k``'s
gallery (``reindex``: ``S_t``'s index of it; ``no_reindex``: ``S_k``'s;
``remap_KIND``: the index of ``S_k``'s vectors moved into ``S_t``'s space),
or task-agnostic in the union of galleries ``0..t``. Under a compensation
policy (``no_reindex+shift`` …) the query is moved into each kept gallery's
space by the run's stored drift map (``maps/after_task_TT.npz``), and the
task-agnostic hits of the per-gallery searches are merged by score. Nothing
trains and no gallery is embedded again: the command loads the run's config and
tokenizer, ``S_t``, the indexes and ``galleries/task_KK.json`` (what each
index row is). Images to show (``--out``, ``--image_id``) come from the
data: the synthetic scenes are generated again from their seed (the
evaluation split only), file-backed data is read from the prepared dataset.

A text query is *from the split* when its normalised text is a caption of a
searched gallery; an image query when given by ``--image_id``. Then each hit
says whether it is a ground-truth match, by the evaluation's rule: an image
and a caption match when the image has a caption of the same normalised text.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np
from absl import flags

from ccmr_jax import checkpoint, cli, drift_maps, index, manifest, metrics, policies, sharding
from ccmr_jax import workdir as layout
from ccmr_jax.data import sources
from ccmr_jax.data.examples import normalize_caption
from ccmr_jax.data.tokenizer import Tokenizer, tokenizer_from_json

SCOPES = tuple(metrics.SCOPES)


@dataclasses.dataclass(frozen=True)
class Query:
  """A text (searched among images) or an image (searched among captions)."""

  text: str | None = None
  image: np.ndarray | None = None  # uint8 [S, S, 3]
  image_id: int | None = None  # set when the image is one of the evaluation split's

  @property
  def direction(self) -> str:
    return "t2i" if self.text is not None else "i2t"


@dataclasses.dataclass(frozen=True)
class Hit:
  rank: int
  score: float
  task: int
  image_id: int  # the image (t2i), or the image the caption describes (i2t)
  caption: str | None  # the caption (i2t)
  correct: bool | None  # None: the query is not from the split


@dataclasses.dataclass(frozen=True)
class Gallery:
  """``galleries/task_KK.json``: the items behind the rows of task ``k``'s indexes."""

  task: int
  image_ids: np.ndarray
  captions: tuple[str, ...]
  caption_image: np.ndarray

  @classmethod
  def load(cls, workdir: str, task: int) -> "Gallery":
    path = layout.gallery_path(workdir, task)
    if not manifest.is_sealed(path):
      raise cli.UserError(f"no {path}: task {task} has not been evaluated in this workdir (rerun it to write it)")
    data = manifest.read_json(path)
    return cls(task, np.asarray(data["image_ids"], np.int64), tuple(data["captions"]),
               np.asarray(data["caption_image"], np.int64))

  @functools.cached_property
  def normalized(self) -> tuple[str, ...]:
    """Each caption's normalised text, computed once (the ground truth compares these)."""
    return tuple(normalize_caption(c) for c in self.captions)

  def texts_of_image(self, row: int) -> set[str]:
    return {text for text, i in zip(self.normalized, self.caption_image) if i == row}


def _abstract_params(model, config: ml_collections.ConfigDict, tokenizer: Tokenizer, mesh):
  """The shapes of the model's params (no compilation), replicated over ``mesh``: the target of a restore."""
  size = sources.input_image_size(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), np.uint8),
                          jax.ShapeDtypeStruct((1, tokenizer.max_length), np.int32))
  replicated = sharding.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)


def read_run(workdir: str) -> tuple[ml_collections.ConfigDict, Tokenizer, list[int]]:
  """A run's config, tokenizer and evaluated tasks (the snapshots a search may use).

  Raises:
    cli.UserError: no run in ``workdir``, or no task evaluated yet.
  """
  if not manifest.is_sealed(layout.config_path(workdir)):
    raise cli.UserError(f"{workdir} holds no run (no config.json): --workdir must be a run's workdir")
  config = ml_collections.ConfigDict(manifest.read_json(layout.config_path(workdir)))
  done = list(range(layout.first_unfinished_task(workdir, config.data.num_tasks)))
  if not done:
    raise cli.UserError(f"{workdir} has no evaluated task yet: let the run finish task 0 first")
  return config, tokenizer_from_json(manifest.read_text(layout.tokenizer_path(workdir))), done


class StoredGalleries:
  """The galleries of tasks ``0..after_task`` as the run stored them: indexes and what their rows are."""

  def __init__(self, workdir: str, after_task: int):
    self.workdir, self.after_task = workdir, after_task
    self.galleries = [Gallery.load(workdir, k) for k in range(after_task + 1)]

  def search(self, vector: np.ndarray, query: Query, policy: str, scope: str, task: int, k: int) -> list[Hit]:
    """The top-``k`` of ``vector`` under ``policy`` in ``scope`` (``task``: the gallery of task-aware search)."""
    rule = policies.get(policy)
    if scope == "task_aware":
      rows, scores = index.search(self._searcher(rule, task, query), self._moved(rule, vector, task, query), k)
      tasks = [task]
    elif rule.query_map is None:
      path = layout.union_index_dir(self.workdir, policy, self.after_task, _gallery_kind(query))
      rows, scores = index.search(_load(path, policy), vector, k)
      tasks = list(range(self.after_task + 1))
    else:  # one index per gallery, each searched with the query moved into its space; hits merged by score
      tasks = list(range(self.after_task + 1))
      found = [index.search(self._searcher(rule, j, query), self._moved(rule, vector, j, query), k) for j in tasks]
      sizes = [self._size(j, query) for j in tasks]
      rows, scores = policies.merge_top_k([f[0] for f in found], [f[1] for f in found], sizes, k)
    return [self._hit(rank, float(score), int(row), tasks, query)
            for rank, (row, score) in enumerate(zip(rows[0], scores[0]), 1)]

  def _searcher(self, rule: policies.IndexingPolicy, task: int, query: Query) -> index.Searcher:
    """Task ``task``'s index as ``rule`` searches it after :attr:`after_task`."""
    if rule.moves_gallery(task, self.after_task):
      path = layout.mapped_index_dir(self.workdir, rule.name, self.after_task, task, _gallery_kind(query))
    else:
      path = layout.index_dir(self.workdir, rule.gallery_snapshot(task, self.after_task), task, _gallery_kind(query))
    return _load(path, rule.name)

  def _moved(self, rule: policies.IndexingPolicy, vector: np.ndarray, task: int, query: Query) -> np.ndarray:
    """``vector`` moved into the space of task ``task``'s gallery, as ``rule`` moves queries."""
    if not rule.moves_queries(task, self.after_task):
      return vector
    modality = "captions" if query.direction == "t2i" else "images"
    return self.drift_maps.move(rule.query_map, "to_old", task, modality, vector)

  @functools.cached_property
  def drift_maps(self) -> drift_maps.DriftMaps:
    """The maps fitted after :attr:`after_task` (read on first use)."""
    path = layout.drift_maps_path(self.workdir, self.after_task)
    if not manifest.is_sealed(path):
      raise cli.UserError(f"no {path}: this run was evaluated before drift maps existed; re-evaluate it "
                          "(python -m ccmr_jax.reevaluate) to search under a compensation policy")
    return drift_maps.DriftMaps.load(path, self.after_task)

  def _size(self, task: int, query: Query) -> int:
    gallery = self.galleries[task]
    return len(gallery.image_ids) if query.direction == "t2i" else len(gallery.captions)

  def _hit(self, rank: int, score: float, row: int, tasks: list[int], query: Query) -> Hit:
    """Index row ``row`` of the galleries of ``tasks`` (concatenated in order) as a :class:`Hit`."""
    for task in tasks:
      gallery, size = self.galleries[task], self._size(task, query)
      if row < size:
        break
      row -= size
    if query.direction == "t2i":
      return Hit(rank, score, task, int(gallery.image_ids[row]), None,
                 self._truth_t2i(query.text, gallery.texts_of_image(row)))
    image_row = int(gallery.caption_image[row])
    caption = gallery.captions[row]
    return Hit(rank, score, task, int(gallery.image_ids[image_row]), caption, self._truth_i2t(query, caption))

  def _truth_t2i(self, text: str, texts_of_image: set[str]) -> bool | None:
    wanted = normalize_caption(text)
    if not any(wanted in g.normalized for g in self.galleries):
      return None
    return wanted in texts_of_image

  def _truth_i2t(self, query: Query, caption: str) -> bool | None:
    if query.image_id is None:
      return None
    gallery, row = self.locate_image(query.image_id)
    return normalize_caption(caption) in gallery.texts_of_image(row)

  def locate_image(self, image_id: int) -> tuple[Gallery, int]:
    """The gallery (of tasks ``0..t``) holding ``image_id`` and its row there."""
    for gallery in self.galleries:
      rows = np.flatnonzero(gallery.image_ids == image_id)
      if len(rows):
        return gallery, int(rows[0])
    raise cli.UserError(f"--image_id={image_id} is not an image of the evaluation split of tasks 0..{self.after_task}")

  def evaluated_policies(self) -> list[str]:
    evaluation = manifest.read_json(layout.evaluation_path(self.workdir, self.after_task))
    return [p for p in policies.POLICY_NAMES if p in evaluation.get("task_aware", {})]


def _gallery_kind(query: Query) -> str:
  """The gallery a query searches: images for a caption (t2i), captions for an image (i2t)."""
  return "images" if query.direction == "t2i" else "captions"


def _load(path: str, policy: str) -> index.Searcher:
  try:
    return index.load_searcher(path)
  except FileNotFoundError as e:
    raise cli.UserError(f"{e}: this workdir holds no such index (was the run evaluated under {policy!r}?)") from e


class QueryEncoder:
  """The snapshot ``S_t`` restored alone, with the evaluation's embedders: queries embedded as evaluated."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, tokenizer: Tokenizer, after_task: int):
    from ccmr_jax import evaluate  # noqa: PLC0415 - jitted embedders: after the cheap checks
    from ccmr_jax.models.dual_encoder import build_model  # noqa: PLC0415

    mesh = sharding.make_mesh()
    model = build_model(config.model, tokenizer.vocab_size, tokenizer.max_length)
    self.tokenizer = tokenizer
    self.params = checkpoint.restore_snapshot(workdir, after_task, _abstract_params(model, config, tokenizer, mesh))
    self.embedders = evaluate.make_embedders(model, mesh, config.eval.batch_size)

  def embed(self, query: Query) -> np.ndarray:
    """``float32 [1, D]``: the query embedded by ``S_t``."""
    if query.text is not None:
      return self.embedders.texts(self.params, self.tokenizer.encode([query.text]))
    return self.embedders.images(self.params, query.image[None])


@functools.lru_cache(maxsize=4)
def split_images(config_json: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """``(image_ids, uint8 images)`` of one split of the run's data, to show results (cached per process)."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  try:
    examples = sources.load_split(config, split)
  except (sources.DataError, ValueError) as e:
    raise cli.UserError(f"cannot load the images to show: {e}") from e
  return np.asarray(examples.image_ids), examples.images


def image_by_id(config: ml_collections.ConfigDict, image_id: int) -> np.ndarray:
  ids, images = split_images(config.to_json(), config.eval.split)
  rows = np.flatnonzero(ids == image_id)
  if not len(rows):
    raise cli.UserError(f"--image_id={image_id} is not in the {config.eval.split} split of this run's data")
  return np.asarray(images[int(rows[0])])


def read_image(path: str, size: int) -> np.ndarray:
  """An image file as ``uint8 [size, size, 3]`` (resized, RGB), as the image tower takes it."""
  from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 - only for --image

  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), np.uint8)
  except FileNotFoundError as e:
    raise cli.UserError(f"--image={path}: no such file") from e
  except (UnidentifiedImageError, OSError) as e:
    raise cli.UserError(f"--image={path} does not decode as an image ({e})") from e


def format_table(hits: Sequence[Hit], query: Query) -> str:
  """The ranked hits as a text table: rank, score, task, item, match."""
  lines = ["rank  score   task  " + ("image id" if query.direction == "t2i" else "caption (its image id)") + "  match"]
  for hit in hits:
    item = f"{hit.image_id}" if query.direction == "t2i" else f"{hit.caption!r} ({hit.image_id})"
    match = {True: "yes", False: "no", None: "-"}[hit.correct]
    lines.append(f"{hit.rank:4d}  {hit.score:6.3f}  {hit.task:4d}  {item}  {match}")
  return "\n".join(lines)


def _query(config: ml_collections.ConfigDict, text: str | None, image: str | None, image_id: int | None) -> Query:
  given = [name for name, value in (("--text", text), ("--image", image), ("--image_id", image_id)) if value is not None]
  if len(given) != 1:
    raise cli.UserError(f"give exactly one of --text, --image, --image_id (got {given or 'none'})")
  if text is not None:
    return Query(text=text)
  if image is not None:
    return Query(image=read_image(image, sources.input_image_size(config)))
  return Query(image=image_by_id(config, image_id), image_id=image_id)


def _chosen_policies(galleries: StoredGalleries, wanted: Sequence[str]) -> list[str]:
  evaluated = galleries.evaluated_policies()
  unknown = [p for p in wanted if p not in evaluated]
  if unknown:
    raise cli.UserError(f"--policy {unknown}: the run evaluated {evaluated} only")
  return list(wanted) or evaluated


def _chosen_task(galleries: StoredGalleries, query: Query, scope: str, task: int | None) -> int | None:
  if scope not in SCOPES:
    raise cli.UserError(f"--scope={scope!r}: choose one of {list(SCOPES)}")
  if scope == "task_agnostic":
    return None
  if task is None:  # the query image's own task, else the newest
    return galleries.locate_image(query.image_id)[0].task if query.image_id is not None else galleries.after_task
  if not 0 <= task <= galleries.after_task:
    raise cli.UserError(f"--task={task}: after task {galleries.after_task} the galleries are tasks "
                        f"0..{galleries.after_task}")
  return task


def run_search(workdir: str, text: str | None = None, image: str | None = None, image_id: int | None = None,
               after_task: int | None = None, policy: Sequence[str] = (), scope: str = "task_aware",
               task: int | None = None, k: int = 5) -> tuple[Query, dict[str, list[Hit]], dict[str, float]]:
  """The command without its printing: the query, ``{policy: hits}`` and the seconds each stage took."""
  start = time.perf_counter()
  config, tokenizer, done = read_run(workdir)
  after_task = done[-1] if after_task is None else after_task
  if after_task not in done:
    raise cli.UserError(f"--after_task={after_task}: the run evaluated tasks 0..{done[-1]} only")
  galleries = StoredGalleries(workdir, after_task)
  query = _query(config, text, image, image_id)
  chosen, task = _chosen_policies(galleries, policy), _chosen_task(galleries, query, scope, task)
  encoder = QueryEncoder(workdir, config, tokenizer, after_task)
  encoder.embed(query)  # compiles the embedder: start-up, as a server would before its first query
  seconds = {"start_up": time.perf_counter() - start}
  begin = time.perf_counter()
  vector = encoder.embed(query)
  seconds["embed"] = time.perf_counter() - begin
  hits = {p: galleries.search(vector, query, p, scope, task, k) for p in chosen}
  seconds["search"] = time.perf_counter() - begin - seconds["embed"]
  return query, hits, seconds


def define_flags() -> None:
  """The command's flags (defined only when it runs: the module is imported by every run's report)."""
  flags.DEFINE_string("workdir", None, "The workdir of a run.", required=True)
  flags.DEFINE_string("text", None, "A caption to search for among images (text -> image).")
  flags.DEFINE_string("image", None, "An image file to search for among captions (image -> text).")
  flags.DEFINE_integer("image_id", None, "An image of the run's evaluation split, by id (image -> text).")
  flags.DEFINE_integer("after_task", None, "Search as the system stood after this task (default: the last).")
  flags.DEFINE_list("policy", [], "Indexing policies to compare (default: every policy the run evaluated).")
  flags.DEFINE_string("scope", "task_aware", "task_aware (one task's gallery) or task_agnostic (the union).")
  flags.DEFINE_integer("task", None, "The gallery of a task-aware search (default: the query image's task, "
                       "else the newest).")
  flags.DEFINE_integer("k", 5, "Results per policy.", lower_bound=1)
  flags.DEFINE_string("out", None, "Also write an image grid here (a .png): one row per policy.")


@cli.exits_on_user_error()
def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  query, hits, seconds = run_search(f.workdir, f.text, f.image, f.image_id, f.after_task, f.policy, f.scope, f.task,
                                    f.k)
  after = f.after_task if f.after_task is not None else "the last"
  for policy, policy_hits in hits.items():
    print(f"\n{policy} ({f.scope}, after task {after})")
    print(format_table(policy_hits, query))
  if f.out:
    from ccmr_jax import search_figures  # noqa: PLC0415 - matplotlib only when a grid is asked for

    config = read_run(f.workdir)[0]
    rows = [(policy, query, policy_hits) for policy, policy_hits in hits.items()]
    print(f"\nwrote {search_figures.plot_grid(rows, functools.partial(image_by_id, config), f.out)}")
  print(f"\nanswered in {seconds['embed'] + seconds['search']:.3f} s (embedding {seconds['embed']:.3f} s, "
        f"index loading and search {seconds['search']:.3f} s) after {seconds['start_up']:.1f} s of start-up")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
