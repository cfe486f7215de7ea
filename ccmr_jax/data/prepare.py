"""Builds the TFDS files of Flickr30K or MS-COCO once, before any run.

  python -m ccmr_jax.data.prepare --dataset=flickr30k --manual_dir=DIR [--data_dir=~/tensorflow_datasets]
  python -m ccmr_jax.data.prepare --dataset=coco [--data_dir=~/tensorflow_datasets]

The same as ``tfds build`` (which, in TFDS 4.9.10, cannot start without
``apache-beam`` and ``mlcroissant``): Flickr30K from the files in ``--manual_dir`` (see
:mod:`ccmr_jax.data.flickr30k_builder`), COCO (``coco_captions/2014``)
downloaded from images.cocodataset.org, or from ``--manual_dir`` when given.
Needs ``pip install 'ccmr_jax[data]'``. Bad files stop it with a message
naming them (exit code 2).
"""

from __future__ import annotations

import os

from absl import app, flags

from ccmr_jax import cli

_DATASET = flags.DEFINE_enum("dataset", None, ["flickr30k", "coco"], "Which dataset to build.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "Where TFDS writes the prepared dataset.")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", "", "Folder with the manually downloaded files (Flickr30K: dataset_flickr30k.json and the images).")


def prepare(dataset: str, data_dir: str, manual_dir: str = "") -> str:
  """Builds ``dataset`` into ``data_dir``; returns the prepared folder.

  Raises:
    sources.DataError: TensorFlow Datasets is missing, or the manual files
      are missing or malformed.
  """
  from ccmr_jax.data import sources

  _, tfds = sources.import_tfds(dataset)
  data_dir, manual_dir = os.path.expanduser(data_dir), os.path.expanduser(manual_dir)
  if dataset == "flickr30k":
    from ccmr_jax.data import flickr30k_builder

    if not manual_dir:
      raise sources.DataError("Flickr30K is built from files you download: pass --manual_dir=DIR, the folder "
                              "with dataset_flickr30k.json and the images\n\n"
                              + sources.not_prepared_message("flickr30k", data_dir))
    if not os.path.isdir(manual_dir):
      raise sources.DataError(f"--manual_dir={manual_dir} is not a folder\n\n"
                              + sources.not_prepared_message("flickr30k", data_dir, manual_dir))
    errors = (flickr30k_builder.Flickr30kError,)
  else:
    errors = ()
  builder = tfds.builder(sources.TFDS_NAMES[dataset], data_dir=data_dir)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
  try:
    builder.download_and_prepare(download_config=config)
  except errors as e:
    raise sources.DataError(str(e)) from e
  return os.fspath(builder.data_dir)


@cli.exits_on_user_error()
def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ccmr_jax.data import sources

  try:
    print(f"prepared {prepare(_DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value)}")
  except sources.DataError as e:
    raise cli.UserError(str(e)) from e


if __name__ == "__main__":
  cli.run(main)
