"""CLIP's byte-level BPE tokenizer, for text towers converted from open_clip checkpoints.

The towers of :mod:`ccmr_jax.models.from_open_clip` read the ids of
open_clip's ``SimpleTokenizer``; this is a reimplementation of it that needs
neither PyTorch nor open_clip, only the merges file that ships with the
``open-clip-torch`` package (``bpe_simple_vocab_16e6.txt.gz``), found there by
default or named by ``config.tokenizer.bpe_vocab``. From text to ids:

1. clean: ``ftfy.fix_text``, HTML entities unescaped twice, runs of
   whitespace collapsed to one space, lower case;
2. split into pieces: an English contraction suffix (``'s``, ``'t``, ``'re``,
   ``'ve``, ``'m``, ``'ll``, ``'d``), a run of letters, one digit, or a run of
   other non-space characters (the special tokens are kept whole);
3. each piece's UTF-8 bytes become printable characters (one per byte), the
   last one marked as ending a word (``</w>``);
4. byte-pair merges: the adjacent pair of symbols with the lowest merge rank
   is joined everywhere in the piece, again and again, until no adjacent pair
   has a rank;
5. each symbol's id: the 256 byte symbols (in the order of
   :func:`byte_symbols`), the same 256 ending a word, one id per
   merge (the first 48,894 lines after the header), then ``<start_of_text>``
   (49406) and ``<end_of_text>`` (49407): 49,408 ids.

A caption is ``[start, ids…, end]``, cut to ``max_length`` with the end token
kept last, then padded with 0 (which is also the id of ``!``: the text tower
pools at the last token that is not 0, which is always the end token).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import html
import importlib.util
import json
import os
from typing import Sequence

import numpy as np

from ccmr_jax import files
from ccmr_jax.data.tokenizer import PAD_ID

KIND = "clip_bpe"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
_PIECES = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _text_modules():
  """``(ftfy, regex)``, or an error saying which extra installs them."""
  try:
    import ftfy
    import regex
  except ImportError as e:
    raise ImportError(f"the CLIP tokenizer needs ftfy and regex ({e}): pip install -e '.[clip]'") from e
  return ftfy, regex


def default_vocab_path() -> str:
  """The merges file inside the installed ``open-clip-torch`` package (found without importing it)."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"open-clip-torch is not installed, and it holds CLIP's {VOCAB_FILE}: "
                            "pip install -e '.[clip]', or set tokenizer.bpe_vocab to a copy of the file")
  return os.path.join(list(spec.submodule_search_locations)[0], VOCAB_FILE)


def byte_symbols() -> dict[int, str]:
  """The printable character standing for each byte value, in vocabulary order.

  Bytes that are printable Latin-1 characters (``!``..``~``, ``¡``..``¬``,
  ``®``..``ÿ``) stand for themselves and come first; the others follow in
  byte order, taking the characters from U+0100 on.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  others = [byte for byte in range(256) if byte not in printable]
  return {**{byte: chr(byte) for byte in printable}, **{byte: chr(256 + i) for i, byte in enumerate(others)}}


@functools.lru_cache(maxsize=4)
def _read_merges(path: str, sha256: str) -> tuple[tuple[str, str], ...]:
  """The merges of the file at ``path`` (whose content hashes to ``sha256``: the cache key)."""
  del sha256
  try:
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")[1:NUM_MERGES + 1]
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not CLIP's gzipped BPE merges file ({e})") from e
  merges = tuple(tuple(line.split()) for line in lines)
  if len(merges) != NUM_MERGES or any(len(pair) != 2 for pair in merges):
    raise ValueError(f"{path} is not CLIP's BPE merges file: expected {NUM_MERGES} lines of two symbols")
  return merges


@dataclasses.dataclass(frozen=True)
class ClipTokenizer:
  """open_clip's tokenizer: caption text to ``int32 [n, max_length]`` ids.

  Attributes:
    vocab_sha256: the sha256 of the merges file (two tokenizers are equal when
      their files and lengths are).
    max_length: tokens per caption (CLIP's context length, 77), start and end
      tokens included.
    vocab_path: where the merges file was read.
  """

  vocab_sha256: str
  max_length: int
  vocab_path: str = dataclasses.field(compare=False)

  def __post_init__(self):
    if self.max_length < 2:
      raise ValueError(f"tokenizer.max_length must be >= 2 (start and end tokens), got {self.max_length}")
    ftfy, regex = _text_modules()
    merges = _read_merges(self.vocab_path, self.vocab_sha256)
    symbols = byte_symbols()
    singles = list(symbols.values())
    vocab = [*singles, *(s + "</w>" for s in singles), *("".join(pair) for pair in merges), *SPECIAL_TOKENS]
    object.__setattr__(self, "_ids", {symbol: i for i, symbol in enumerate(vocab)})
    object.__setattr__(self, "_ranks", {pair: rank for rank, pair in enumerate(merges)})
    object.__setattr__(self, "_byte_symbols", symbols)
    object.__setattr__(self, "_pieces", regex.compile(_PIECES, regex.IGNORECASE))
    object.__setattr__(self, "_fix_text", ftfy.fix_text)
    object.__setattr__(self, "_cache", {})

  @classmethod
  def load(cls, vocab_path: str, max_length: int) -> "ClipTokenizer":
    """The tokenizer of the merges file at ``vocab_path`` ("": the one open-clip-torch ships)."""
    path = os.path.expanduser(vocab_path) if vocab_path else default_vocab_path()
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no CLIP BPE merges file at {path} (tokenizer.bpe_vocab)")
    return cls(files.file_sha256(path), max_length, path)

  @property
  def vocab_size(self) -> int:
    return len(self._ids)

  @property
  def start_id(self) -> int:
    return self._ids[SPECIAL_TOKENS[0]]

  @property
  def end_id(self) -> int:
    return self._ids[SPECIAL_TOKENS[1]]

  def clean(self, text: str) -> str:
    text = html.unescape(html.unescape(self._fix_text(text))).strip()
    return " ".join(text.split()).lower()

  def _merge(self, piece: str) -> list[int]:
    """The ids of one piece (its characters already byte symbols) after the BPE merges."""
    if piece in SPECIAL_TOKENS:
      return [self._ids[piece]]
    known = self._cache.get(piece)
    if known is not None:
      return known
    symbols = [*piece[:-1], piece[-1] + "</w>"]
    while len(symbols) > 1:
      rank, first, second = min((self._ranks.get(pair, NUM_MERGES), *pair) for pair in zip(symbols, symbols[1:]))
      if rank == NUM_MERGES:
        break
      merged, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    ids = [self._ids[symbol] for symbol in symbols]
    self._cache[piece] = ids
    return ids

  def text_ids(self, text: str) -> list[int]:
    """The ids of ``text`` without start and end tokens (steps 1–5 of the module docstring)."""
    ids = []
    for piece in self._pieces.findall(self.clean(text)):
      ids.extend(self._merge("".join(self._byte_symbols[b] for b in piece.encode("utf-8"))))
    return ids

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """``int32 [len(texts), max_length]``: start, the text's ids, end (kept when cut), then padding."""
    out = np.full((len(texts), self.max_length), PAD_ID, dtype=np.int32)
    for row, text in enumerate(texts):
      ids = [self.start_id, *self.text_ids(text)][: self.max_length - 1] + [self.end_id]
      out[row, : len(ids)] = ids
    return out

  def to_json(self) -> str:
    return json.dumps({"kind": KIND, "vocab_sha256": self.vocab_sha256, "max_length": self.max_length,
                       "vocab_path": self.vocab_path}, indent=1)

  @classmethod
  def from_json(cls, text: str) -> "ClipTokenizer":
    """The tokenizer a :meth:`to_json` wrote, its merges file read again and checked.

    The recorded path is tried first, then the file open-clip-torch ships
    (a workdir moved to another machine); either must have the recorded
    sha256.
    """
    try:
      data = json.loads(text)
      sha256, max_length, recorded = str(data["vocab_sha256"]), int(data["max_length"]), str(data["vocab_path"])
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"malformed CLIP tokenizer file: {e}") from e
    candidates = [recorded]
    try:
      candidates.append(default_vocab_path())
    except FileNotFoundError:
      pass
    for path in candidates:
      if os.path.isfile(path) and files.file_sha256(path) == sha256:
        return cls(sha256, max_length, path)
    raise ValueError(f"the CLIP BPE merges file with sha256 {sha256[:12]}… is neither at {recorded} nor in the "
                     "installed open-clip-torch: install it (pip install -e '.[clip]') or restore the file")
