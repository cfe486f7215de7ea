"""The workdir's file layer: whole-or-absent writes, local or on cloud storage.

Every file the program writes goes through here, so a workdir may be a local
folder or a ``gs://`` (or ``s3://``) prefix (through ``etils.epath``; cloud
storage needs ``gcsfs``/``s3fs``, see the ``gcs`` extra). Orbax snapshots take
the same paths natively.

Whole or absent: a local file is written beside its target and renamed onto
it; a cloud object is uploaded in one request, which its store commits whole.
A folder (a ScaNN index) is marked complete by the file written last (see
:func:`upload_folder`). A reader never sees a half-written file. The
checksummed artifacts of a workdir (``.npz`` arrays among them) are written
and read through :mod:`ccmr_jax.manifest`, on top of this layer.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile


# One backend for cloud paths whether or not TensorFlow is installed (the `data` extra brings it): fsspec
# (gcsfs/s3fs), as documented. Set EPATH_USE_TF=true to route them through tf.io.gfile instead.
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402

_REMOTE_PREFIXES = ("gs://", "s3://")


class CorruptFileError(ValueError):
  """A workdir file that exists but cannot be read as what it should be; the message names the fix."""


def is_remote(path) -> bool:
  return str(path).startswith(_REMOTE_PREFIXES)


def absolute(path: str) -> str:
  """``path`` made absolute when local; cloud paths are already absolute."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def is_dir(path: str) -> bool:
  return epath.Path(path).is_dir()


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def listdir(path: str) -> list[str]:
  return sorted(p.name for p in epath.Path(path).iterdir())


def remove(path: str) -> None:
  epath.Path(path).unlink()


def remove_tree(path: str) -> None:
  epath.Path(path).rmtree()


def atomic_write_bytes(path: str, data: bytes) -> None:
  if is_remote(path):
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError) and e.filename is None:
      e.filename = path  # a full disk surfaces in write or fsync, which name no file
    raise


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj) -> None:
  atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n")


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def read_json(path: str):
  try:
    return json.loads(read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CorruptFileError(f"{path} is not valid JSON ({e}); delete it to recompute it") from e


def atomic_save_figure(figure, path: str, dpi: int = 110) -> None:
  """Saves a matplotlib figure as a PNG at ``path``, whole or not at all."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
  atomic_write_bytes(path, buffer.getvalue())


def upload_folder(local_folder: str, path: str, last: str) -> None:
  """Puts the files of ``local_folder`` at ``path``; the file named ``last`` is written last.

  Locally the whole folder is renamed into place (replacing an older one).
  On cloud storage the files are uploaded one by one with ``last`` at the
  end, so a reader that checks for ``last`` never takes a partial folder.
  """
  if not is_remote(path):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staged = tempfile.mkdtemp(prefix=".tmp_", dir=parent)
    try:
      for name in os.listdir(local_folder):
        os.replace(os.path.join(local_folder, name), os.path.join(staged, name))
      if os.path.exists(path):
        epath.Path(path).rmtree()
      os.replace(staged, path)
    finally:
      if os.path.exists(staged):
        epath.Path(staged).rmtree()
    return
  target = epath.Path(path)
  if target.exists():
    target.rmtree()
  target.mkdir(parents=True, exist_ok=True)
  names = sorted(os.listdir(local_folder), key=lambda name: name == last)
  for name in names:
    (target / name).write_bytes(epath.Path(local_folder, name).read_bytes())


def _files_under(root: epath.Path) -> list[epath.Path]:
  found = []
  for item in root.iterdir():
    found += _files_under(item) if item.is_dir() else [item]
  return found


def copy_tree(source: str, path: str) -> None:
  """Copies the folder ``source`` to ``path`` (local or cloud), whole or absent locally.

  Locally the copy is made beside ``path`` and renamed onto it; on cloud
  storage files are copied one by one, an Orbax completion marker last.
  """
  root = epath.Path(source)
  # Orbax marks a checkpoint on cloud storage complete with commit_success.txt: it goes last.
  items = sorted(_files_under(root), key=lambda item: item.name == "commit_success.txt")
  staged = path
  if not is_remote(path):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staged = tempfile.mkdtemp(prefix=".tmp_", dir=parent)
  try:
    for item in items:
      target = epath.Path(staged) / item.relative_to(root)
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(item.read_bytes())
    if staged != path:
      os.replace(staged, path)
  finally:
    if staged != path and os.path.exists(staged):
      epath.Path(staged).rmtree()


def download_folder(path: str, local_folder: str) -> None:
  """Copies the files of ``path`` (local or cloud) into ``local_folder``."""
  for name in listdir(path):
    with open(os.path.join(local_folder, name), "wb") as f:
      f.write(read_bytes(os.path.join(path, name)))


def file_sha256(path: str) -> str:
  """The sha256 (hex) of a local file's bytes, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
