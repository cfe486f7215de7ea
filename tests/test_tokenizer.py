import numpy as np
import pytest

from ccmr_jax.data.tokenizer import PAD_ID, START_ID, Tokenizer, build_tokenizer


def test_vocabulary_comes_from_the_given_captions_only_and_new_words_hash_stably():
  tok = build_tokenizer(["a red circle", "A red square!"], max_length=6, num_oov_buckets=16)
  assert set(tok.words) == {"a", "red", "circle", "square"}
  ids = tok.encode(["a red hexagon", "a red hexagon"])
  assert ids[0, 0] == START_ID and ids[0, 1] == tok.word_id("a")
  oov = ids[0, 3]
  assert oov >= 2 + len(tok.words) and oov < tok.vocab_size
  np.testing.assert_array_equal(ids[0], ids[1])
  assert ids[0, 4] == PAD_ID
  # A fresh tokenizer (another process, another day) hashes the same word to the same id.
  again = build_tokenizer(["a red circle", "A red square!"], max_length=6, num_oov_buckets=16)
  assert again.encode(["hexagon"])[0, 1] == tok.encode(["hexagon"])[0, 1]


def test_truncation_and_json_round_trip():
  tok = build_tokenizer(["one two three four five six seven"], max_length=4, num_oov_buckets=4)
  assert tok.encode(["one two three four five"]).shape == (1, 4)
  back = Tokenizer.from_json(tok.to_json())
  assert back == tok
  with pytest.raises(ValueError, match="malformed tokenizer"):
    Tokenizer.from_json("{\"words\": 3}")
