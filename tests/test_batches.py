import numpy as np

from ccmr_jax.data.batches import PairSampler, caption_text_ids
from ccmr_jax.data.tokenizer import build_tokenizer
from conftest import make_examples


def test_text_ids_equal_exactly_for_the_same_normalised_text():
  np.testing.assert_array_equal(caption_text_ids(["A cat.", "a cat", "a dog"]), [0, 0, 1])


def _sampler(n=40):
  examples = make_examples([[0]] * n, captions_per_image=3)
  return PairSampler.create(examples, build_tokenizer(examples.captions, 8, 4)), examples


def test_epochs_are_deterministic_visit_each_image_once_and_pair_own_captions():
  sampler, examples = _sampler()
  first = list(sampler.epoch(8, seed=1, task=0, epoch=0))
  again = list(sampler.epoch(8, seed=1, task=0, epoch=0))
  other = list(sampler.epoch(8, seed=1, task=0, epoch=1))
  assert len(first) == 5
  rows = np.concatenate([b["image_key"] for b in first])
  assert sorted(rows.tolist()) == list(range(40))
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(first[0]["image_key"], other[0]["image_key"])
  tokenizer = build_tokenizer(examples.captions, 8, 4)
  for batch in first:
    for row, tokens in zip(batch["image_key"], batch["tokens"]):
      own = tokenizer.encode([examples.captions[i] for i in np.flatnonzero(examples.caption_image == row)])
      assert any(np.array_equal(tokens, o) for o in own)


def test_process_shares_make_up_the_global_batch():
  sampler, _ = _sampler()
  whole = list(sampler.epoch(8, seed=2, task=1, epoch=0))
  halves = [list(sampler.epoch(8, seed=2, task=1, epoch=0, process_index=p, process_count=2)) for p in (0, 1)]
  for step, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(batch[key], np.concatenate([halves[0][step][key], halves[1][step][key]]))
