"""Word tokenizer fixed before task 0 (CLIP's BPE tokenizer: :mod:`ccmr_jax.data.clip_tokenizer`).

From scratch, the vocabulary is built from the captions of task 0's training
split only, so it carries no information from later tasks. A run from
pretrained towers (``model.init_from``) uses theirs instead, built from the
pretraining corpus's captions (:mod:`ccmr_jax.pretrain`). Words first met later are not
lost: each is hashed (CRC32, stable across runs and machines) into one of
``num_oov_buckets`` extra ids, so different new words mostly get different
ids that the text tower can learn when their task arrives.

Id layout: 0 = padding, 1 = start token (the text tower's summary position),
2 .. 2+V-1 = vocabulary words, then the OOV buckets.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import zlib
from typing import Iterable, Sequence

import numpy as np

from ccmr_jax.data.examples import normalize_caption

PAD_ID = 0
START_ID = 1
# config.tokenizer.kind: this module's word tokenizer, or CLIP's BPE (ccmr_jax.data.clip_tokenizer).
TOKENIZER_KINDS = ("words", "clip_bpe")
_FIRST_WORD_ID = 2


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Maps caption text to fixed-length int32 token ids.

  Attributes:
    words: the vocabulary, in id order.
    num_oov_buckets: hash buckets for words outside the vocabulary.
    max_length: tokens per caption, start token included; longer captions are cut.
  """

  words: tuple[str, ...]
  num_oov_buckets: int
  max_length: int

  def __post_init__(self):
    if self.num_oov_buckets < 1 or self.max_length < 2:
      raise ValueError("num_oov_buckets must be >= 1 and max_length >= 2")
    object.__setattr__(self, "_ids", {w: i + _FIRST_WORD_ID for i, w in enumerate(self.words)})

  @property
  def vocab_size(self) -> int:
    return _FIRST_WORD_ID + len(self.words) + self.num_oov_buckets

  def word_id(self, word: str) -> int:
    known = self._ids.get(word)
    if known is not None:
      return known
    return _FIRST_WORD_ID + len(self.words) + zlib.crc32(word.encode()) % self.num_oov_buckets

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """``int32 [len(texts), max_length]``: start token, word ids, then padding."""
    out = np.full((len(texts), self.max_length), PAD_ID, dtype=np.int32)
    out[:, 0] = START_ID
    for row, text in enumerate(texts):
      ids = [self.word_id(w) for w in normalize_caption(text).split()][: self.max_length - 1]
      out[row, 1 : 1 + len(ids)] = ids
    return out

  def to_json(self) -> str:
    return json.dumps({"words": list(self.words), "num_oov_buckets": self.num_oov_buckets,
                       "max_length": self.max_length}, indent=1)

  @classmethod
  def from_json(cls, text: str) -> "Tokenizer":
    try:
      data = json.loads(text)
      return cls(tuple(data["words"]), int(data["num_oov_buckets"]), int(data["max_length"]))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"malformed tokenizer file: {e}") from e


def build_tokenizer(captions: Iterable[str], max_length: int, num_oov_buckets: int,
                    min_count: int = 1) -> Tokenizer:
  """Vocabulary of the words seen at least ``min_count`` times, most frequent first."""
  counts = collections.Counter(w for text in captions for w in normalize_caption(text).split())
  words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
  return Tokenizer(tuple(words), num_oov_buckets, max_length)


def tokenizer_from_json(text: str):
  """The tokenizer a ``to_json`` wrote: the word :class:`Tokenizer`, or CLIP's BPE one (``"kind": "clip_bpe"``)."""
  try:
    kind = json.loads(text).get("kind", "words")
  except (ValueError, AttributeError) as e:
    raise ValueError(f"malformed tokenizer file: {e}") from e
  if kind == "clip_bpe":
    from ccmr_jax.data.clip_tokenizer import ClipTokenizer
    return ClipTokenizer.from_json(text)
  return Tokenizer.from_json(text)
