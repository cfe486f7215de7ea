"""The search command on a finished tiny run: the evaluation's rankings, its errors, its grid, the report's examples."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ccmr_jax import cli, drift_maps, experiment, index, manifest, metrics, policies, search, search_figures
from ccmr_jax import workdir as layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finished(tiny_run):
  return tiny_run[0]  # one tiny run shared with tests/test_experiment.py (tests/conftest.py)


@pytest.mark.parametrize("after_task", [0, 1])
def test_a_test_query_ranks_as_the_evaluation_ranked_it(finished, after_task):
  config, tokenizer, _ = search.read_run(finished)
  galleries = search.StoredGalleries(finished, after_task)
  encoder = search.QueryEncoder(finished, config, tokenizer, after_task)
  stored = manifest.load_npz(layout.embeddings_path(finished, after_task, 0))
  gallery = galleries.galleries[0]
  truth = metrics.GroundTruth.from_captions(gallery.captions, gallery.caption_image)
  split = experiment.load_task_stream(config).tasks[0].splits["test"]
  maps = drift_maps.DriftMaps.load(layout.drift_maps_path(finished, after_task), after_task) if after_task else None
  for policy in policies.POLICY_NAMES:
    rule = policies.get(policy)
    prepared = rule.prepare_queries(policies.EmbeddedSplit(stored["images"], stored["captions"]), 0, after_task, maps)
    for direction, modality, rows in (("t2i", "captions", range(0, 40, 7)), ("i2t", "images", range(0, 20, 3))):
      kind = "images" if direction == "t2i" else "captions"
      searcher = index.load_searcher(
          layout.mapped_index_dir(finished, policy, after_task, 0, kind) if rule.moves_gallery(0, after_task)
          else layout.index_dir(finished, rule.gallery_snapshot(0, after_task), 0, kind))
      for row in rows:
        query = (search.Query(text=gallery.captions[row]) if direction == "t2i"
                 else search.Query(image=split.images[row], image_id=int(gallery.image_ids[row])))
        hits = galleries.search(encoder.embed(query), query, policy, "task_aware", 0, 5)
        evaluated, _ = index.search(searcher, getattr(prepared, modality)[row:row + 1], 5)  # what the evaluation ranked
        if direction == "t2i":
          assert [h.image_id for h in hits] == [int(gallery.image_ids[r]) for r in evaluated[0]]
          expected = truth.t2i_hits(evaluated, np.array([row]))[0]
        else:
          assert [h.caption for h in hits] == [gallery.captions[r] for r in evaluated[0]]
          expected = truth.i2t_hits(evaluated, np.array([row]))[0]
        assert [h.correct for h in hits] == list(expected), (policy, direction, row)


def test_task_agnostic_hits_name_their_task(finished):
  config, tokenizer, _ = search.read_run(finished)
  galleries = search.StoredGalleries(finished, 1)
  caption = galleries.galleries[1].captions[0]
  query = search.Query(text=caption)
  vector = search.QueryEncoder(finished, config, tokenizer, 1).embed(query)
  hits = galleries.search(vector, query, "reindex", "task_agnostic", None, 20)
  union = [(k, int(i)) for k, g in enumerate(galleries.galleries) for i in g.image_ids]
  assert {(h.task, h.image_id) for h in hits} <= set(union)
  assert any(h.task == 1 for h in hits) and all(h.correct is not None for h in hits)


def test_task_agnostic_search_under_query_compensation_merges_each_gallery_in_its_own_space(finished):
  config, tokenizer, _ = search.read_run(finished)
  galleries = search.StoredGalleries(finished, 1)
  query = search.Query(text=galleries.galleries[0].captions[3])
  vector = search.QueryEncoder(finished, config, tokenizer, 1).embed(query)
  hits = galleries.search(vector, query, "no_reindex+procrustes", "task_agnostic", None, 8)
  maps = drift_maps.DriftMaps.load(layout.drift_maps_path(finished, 1), 1)
  parts = [(manifest.load_npz(layout.embeddings_path(finished, 0, 0))["images"],
            maps.move("procrustes", "to_old", 0, "captions", vector)),
           (manifest.load_npz(layout.embeddings_path(finished, 1, 1))["images"], vector)]
  scored = sorted(((float(g[row] @ q[0]), task, int(galleries.galleries[task].image_ids[row]))
                   for task, (g, q) in enumerate(parts) for row in range(len(g))), key=lambda x: -x[0])[:8]
  assert [(h.task, h.image_id) for h in hits] == [(task, image_id) for _, task, image_id in scored]
  np.testing.assert_allclose([h.score for h in hits], [score for score, _, _ in scored], atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give exactly one of --text, --image, --image_id"),
    ({"text": "a circle", "image_id": 3}, "give exactly one of"),
    ({"text": "a circle", "after_task": 5}, "--after_task=5: the run evaluated tasks 0..1 only"),
    ({"text": "a circle", "policy": ["bogus"]}, "--policy ['bogus']: the run evaluated"),
    ({"text": "a circle", "task": 3}, "--task=3: after task 1 the galleries are tasks 0..1"),
    ({"text": "a circle", "scope": "everywhere"}, "--scope='everywhere'"),
    ({"image_id": 123}, "--image_id=123 is not in the test split"),
    ({"image": "/nonexistent.png"}, "--image=/nonexistent.png: no such file"),
])
def test_bad_queries_are_one_line_errors(finished, kwargs, message):
  with pytest.raises(cli.UserError, match=message.replace("[", r"\[").replace("]", r"\]").replace("?", r"\?")):
    search.run_search(finished, **kwargs)


def test_an_image_that_does_not_decode_and_missing_workdir_parts_are_named(finished, tmp_path):
  not_an_image = tmp_path / "notes.png"
  not_an_image.write_text("hello")
  with pytest.raises(cli.UserError, match="does not decode as an image"):
    search.run_search(finished, image=str(not_an_image))
  with pytest.raises(cli.UserError, match="holds no run"):
    search.run_search(str(tmp_path), text="a circle")
  copy = str(tmp_path / "copy")
  shutil.copytree(finished, copy)
  missing = layout.index_dir(copy, 0, 0, "images")
  shutil.rmtree(missing)
  with pytest.raises(cli.UserError, match=f"no ScaNN index at {missing}"):
    search.run_search(copy, text="a circle", after_task=1, policy=["no_reindex"], task=0)
  manifest.remove_file(layout.gallery_path(copy, 1))
  with pytest.raises(cli.UserError, match="galleries/task_01.json: task 1 has not been evaluated"):
    search.run_search(copy, text="a circle")


def test_the_grid_has_a_row_per_policy_and_frames_the_matches(finished):
  config, _, _ = search.read_run(finished)
  galleries = search.StoredGalleries(finished, 1)
  hits = [search.Hit(1, 0.9, 0, int(galleries.galleries[0].image_ids[0]), None, True),
          search.Hit(2, 0.5, 1, int(galleries.galleries[1].image_ids[0]), None, False)]
  rows = [("reindex", search.Query(text="a circle"), hits), ("no_reindex", search.Query(text="a circle"), hits[:1])]
  figure = search_figures.grid_figure(rows, lambda image_id: search.image_by_id(config, image_id))
  assert len(figure.axes) == 2 * 3
  framed = [ax for ax in figure.axes if ax.spines["top"].get_edgecolor()[:3] == (44 / 255, 160 / 255, 44 / 255)]
  assert len(framed) == 2  # the two correct hits, one per row
  assert not figure.axes[5].axison  # the second row has one hit: its last cell is empty


def test_the_command_prints_the_ranking_and_writes_the_grid(finished, tmp_path):
  caption = search.StoredGalleries(finished, 1).galleries[1].captions[0]
  out = tmp_path / "grid.png"
  proc = subprocess.run([sys.executable, "-m", "ccmr_jax.search", f"--workdir={finished}", f"--text={caption}",
                         "--task=1", f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "reindex (task_aware" in proc.stdout and "no_reindex (task_aware" in proc.stdout
  assert "answered in" in proc.stdout and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_shows_examples(finished):
  results = manifest.read_json(layout.results_path(finished))
  examples = results["examples"]
  assert [e["query"]["direction"] for e in examples] == ["i2t", "i2t", "t2i", "t2i"]
  assert [(r["after_task"], r["policy"]) for r in examples[0]["rows"]] == [
      (0, "reindex"), (0, "no_reindex"), (1, "reindex"), (1, "no_reindex")]
  assert examples[0]["rows"][0]["hits"] == examples[0]["rows"][1]["hits"]  # after task 0 both use S_0's index
  assert os.path.exists(search_figures.examples_path(finished))
  with open(layout.report_path(finished)) as f:
    assert "## Examples" in f.read()
