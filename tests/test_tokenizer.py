import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ccmr_jax.data.tokenizer import PAD_ID, START_ID, Tokenizer, build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_vocabulary_comes_from_the_given_captions_only_and_new_words_hash_stably():
  tok = build_tokenizer(["a red circle", "A red square!"], max_length=6, num_oov_buckets=16)
  assert set(tok.words) == {"a", "red", "circle", "square"}
  ids = tok.encode(["a red hexagon", "a red hexagon"])
  assert ids[0, 0] == START_ID and ids[0, 1] == tok.word_id("a")
  oov = ids[0, 3]
  assert oov >= 2 + len(tok.words) and oov < tok.vocab_size
  np.testing.assert_array_equal(ids[0], ids[1])
  assert ids[0, 4] == PAD_ID
  # A tokenizer built in another process (another hash seed, another day) hashes a new word to the same id.
  code = ("from ccmr_jax.data.tokenizer import build_tokenizer\n"
          "tok = build_tokenizer(['a red circle', 'A red square!'], max_length=6, num_oov_buckets=16)\n"
          "print(tok.encode(['hexagon', 'octagon'])[:, 1].tolist())")
  env = dict(os.environ, PYTHONHASHSEED="12345")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout) == tok.encode(["hexagon", "octagon"])[:, 1].tolist()


def test_truncation_and_json_round_trip():
  tok = build_tokenizer(["one two three four five six seven"], max_length=4, num_oov_buckets=4)
  assert tok.encode(["one two three four five"]).shape == (1, 4)
  back = Tokenizer.from_json(tok.to_json())
  assert back == tok
  with pytest.raises(ValueError, match="malformed tokenizer"):
    Tokenizer.from_json("{\"words\": 3}")
