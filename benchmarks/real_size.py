"""Flickr30K's path at real size: prepare, image cache, input pipeline, training step and host memory.

  python -m benchmarks.real_size                                   # 3,000, 10,000 and 31,783 images
  python -m benchmarks.real_size --images=31783 --root=/mnt/disk/real_size
  python -m benchmarks.real_size --images=3000,10000 --model=tiny  # the data side without ResNet-50
  python -m benchmarks.real_size --quick                           # 40 images, tiny model: a smoke test

Flickr30K cannot be downloaded here, so each size runs on a stand-in,
written once to ``--root/flickr30k-N/manual`` and reused while complete
(its images are hard links to ``--root/images``, which every size shares,
written on every core): ``N`` JPEGs shaped like Flickr30K's (500 px on the long side: 500×375,
375×500, 500×333, ...; blurred shapes over a smooth gradient plus grain,
quality 90: about 65 KB each), five captions each, and Karpathy's
``dataset_flickr30k.json`` (the fields :mod:`ccmr_jax.data.flickr30k_builder`
reads) with Flickr30K's split proportions (29,000 / 1,014 / 1,000 of
31,783). A caption is a person, a clothing phrase, a verb, a word of the
image's concept group (:mod:`ccmr_jax.data.flickr30k`; 30% of the images
name none and join ``people_street``) and 1–4 words of a 20,000-word
Zipf-distributed filler vocabulary, about 13 words in all, so that every
task gets images and the tokenizer a realistic vocabulary.

Each size is measured in two fresh processes, so that each peak RSS
(``ru_maxrss``) is that size's, as users run it:

  prepare    :func:`ccmr_jax.data.prepare.prepare` (what ``python -m ccmr_jax.data.prepare`` runs), images/s
  cache      :func:`ccmr_jax.data.sources.load_dataset` with ``configs/flickr.py`` on an empty
             ``cache_dir``: the one-time decode into the uint8 cache (:mod:`ccmr_jax.data.images`),
             images/s, and the cache's size on disk
  pipeline   one epoch (or ``--pipeline_batches``) of :meth:`PairSampler.epoch` over the training
             split of every task (the ``joint`` sampler, the largest), batches of the config's 128:
             memory-mapped rows → random 224 px crops and flips on ``decode_ahead``'s 4 threads
             (the main thread draws the order and the tokens); no model, no host-to-device copy.
             Pairs/s, and pairs/s ÷ the host's cores
  step       the config's model, loss and optimizer (``configs/flickr.py``: ResNet-50 + Transformer,
             VSE++ hinge, AdamW; ``--model=tiny`` for a tiny one) at ``--step_batch`` in ``--dtype``,
             one real batch of the pipeline placed on the device: the median of ``--rounds`` steps
             after the compiling one (:func:`ccmr_jax.train.make_train_step`; not
             :class:`benchmarks.train_throughput.Trainer`, which builds the scenes config's loss and optimizer)

Memory, MB: the prepare process's peak; then, in the second process (RSS
from ``/proc/self/status``), at its start, after importing TensorFlow and
TFDS, after importing JAX and starting its backend, its peak after the
cache build (decoding on tf.data's threads), its RSS after the build and
before the pipeline, the cache file's resident pages after the pipeline
(its mapping's ``Rss`` in ``/proc/self/smaps``: the rows read so far), the
growth of the rest of the RSS over the pipeline (decode-ahead buffers,
batches; the heap is never trimmed: :mod:`ccmr_jax.host_memory`), and the
peak of the whole process, the training step's included. The stand-in
stays under ``--root``; the TFDS files and the cache of a size are deleted
before and after its measurement.
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from benchmarks import common
from ccmr_jax.data import flickr30k

FLICKR30K_SPLITS = {"train": 29_000, "val": 1_014, "test": 1_000}
KINDS = flickr30k.GROUP_NAMES + ("none",)  # "none": captions that name no concept group
KIND_WEIGHTS = (0.12, 0.08, 0.14, 0.16, 0.2, 0.3)
IMAGE_SIDES = ((500, 375),) * 6 + ((375, 500),) * 3 + ((500, 333),) * 2 + ((333, 500), (500, 400), (500, 281))
JPEG_QUALITY = 90
FILLER_WORDS = 20_000
SUBJECTS = ("a man", "a woman", "two men", "two women", "a young boy", "a little girl", "a group of people",
            "an older man", "three children", "a person", "a teenager", "a couple")
CLOTHES = ("in a red shirt", "wearing a blue jacket", "with a black hat", "in white", "with long hair",
           "in a green dress", "wearing sunglasses", "in a striped sweater")
VERBS = ("stands", "walks", "sits", "waits", "looks", "smiles", "is standing", "is looking")
PLACES_INDOORS = ("at home", "in a kitchen", "inside a room", "at a table", "on a couch")
PREPOSITIONS = ("near the", "with a", "beside the", "behind a", "next to the", "in front of the")
SEED = 0
RUN_COLUMNS = ("images", "wall s", "peak RSS", "cache pages at the peak", "peak of RSS − cache pages")
THROUGHPUT_COLUMNS = ("images", "train/val/test", "prepare img/s", "cache img/s", "cache GB", "pipeline pairs/s",
                      "pipeline pairs/s/core", "step compile s", "step s", "step pairs/s")
MEMORY_COLUMNS = ("images", "prepare peak", "run start", "+ TF/TFDS", "+ JAX", "peak after cache build",
                  "after cache build", "before pipeline", "cache pages after pipeline", "other pipeline growth",
                  "run peak")


def split_sizes(num_images: int) -> dict[str, int]:
  """Images per split in Flickr30K's proportions, val and test at least one per caption kind."""
  total = sum(FLICKR30K_SPLITS.values())
  held_out = {s: max(len(KINDS), round(num_images * FLICKR30K_SPLITS[s] / total)) for s in ("val", "test")}
  train = num_images - sum(held_out.values())
  if train < len(KINDS):
    raise ValueError(f"--images={num_images} is too few for a stand-in: use at least {3 * len(KINDS)}")
  return {"train": train, **held_out}


def filler_vocabulary() -> tuple[list[str], np.ndarray]:
  """``FILLER_WORDS`` made-up words of 2–3 syllables (none a concept-group word) and their Zipf CDF."""
  rng = np.random.default_rng([SEED, 1])
  syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
  words: dict[str, None] = {}
  draws = 4 * FILLER_WORDS
  for length, codes in zip(rng.integers(2, 4, size=draws), rng.integers(len(syllables), size=(draws, 3))):
    word = "".join(syllables[k] for k in codes[:length])
    if not flickr30k.names_a_group([word]):
      words[word] = None
  words_list = list(words)[:FILLER_WORDS]
  weights = 1.0 / np.arange(1, FILLER_WORDS + 1) ** 1.1
  return words_list, np.cumsum(weights) / weights.sum()


def captions(rng: np.random.Generator, kind: str, fillers: tuple[list[str], np.ndarray]) -> list[str]:
  """Five captions of an image of ``kind`` (a concept group, or ``none``)."""
  words, cdf = fillers
  group_words = sorted(flickr30k.CONCEPT_GROUPS[kind]) if kind != "none" else None
  texts = []
  for _ in range(5):
    where = rng.choice(PLACES_INDOORS) if group_words is None \
        else f"{rng.choice(PREPOSITIONS)} {rng.choice(group_words)}"
    filler = [words[i] for i in np.searchsorted(cdf, rng.random(rng.integers(1, 5)))]
    texts.append(" ".join([rng.choice(SUBJECTS), rng.choice(CLOTHES), rng.choice(VERBS), where, *filler]) + ".")
  return texts


def jpeg(rng: np.random.Generator) -> bytes:
  """A Flickr30K-sized JPEG: blurred shapes over a smooth gradient, plus grain (about 65 KB)."""
  width, height = IMAGE_SIDES[rng.integers(len(IMAGE_SIDES))]
  image = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
  draw = ImageDraw.Draw(image)
  for _ in range(rng.integers(6, 14)):
    left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
    box = (left, top, left + int(rng.integers(20, width // 2)), top + int(rng.integers(20, height // 2)))
    shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
    shape(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
  pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(2)), np.float32)
  grain = rng.uniform(6, 10)
  pixels += rng.normal(0, grain, (height, width, 1)) + rng.normal(0, grain / 2, (height, width, 3))
  out = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=JPEG_QUALITY)
  return out.getvalue()


def _standin_complete(manual_dir: str, num_images: int) -> bool:
  try:
    with open(os.path.join(manual_dir, "dataset_flickr30k.json"), encoding="utf-8") as f:
      entries = json.load(f)["images"]
  except (OSError, ValueError, KeyError):
    return False
  image_dir = os.path.join(manual_dir, "flickr30k-images")
  return len(entries) == num_images and all(os.path.exists(os.path.join(image_dir, e["filename"])) for e in entries)


def image_name(i: int) -> str:
  return f"{1_000_092_795 + 7 * i}.jpg"


def _write_image(image_dir: str, i: int) -> None:
  path = os.path.join(image_dir, image_name(i))
  with open(path + ".tmp", "wb") as f:
    f.write(jpeg(np.random.default_rng([SEED, 3, i])))
  os.rename(path + ".tmp", path)


def write_images(image_dir: str, count: int, processes: int) -> None:
  """Images ``0..count-1`` of every stand-in into ``image_dir`` (those not there yet), on ``processes`` processes.

  Image ``i`` comes from a generator seeded with ``i`` alone, so stand-ins of
  every size share their first images and a write cut short resumes.
  """
  os.makedirs(image_dir, exist_ok=True)
  missing = [i for i in range(count) if not os.path.exists(os.path.join(image_dir, image_name(i)))]
  if missing:
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
      pool.map(functools.partial(_write_image, image_dir), missing, chunksize=64)


def write_standin(manual_dir: str, num_images: int, shared_images: str, processes: int) -> bool:
  """Writes the stand-in of ``num_images`` images (see the module docstring) unless it is complete.

  Its images are hard links to the first ``num_images`` of ``shared_images``
  (written there first when missing); the JSON, written aside and renamed,
  comes last. Returns whether it wrote.
  """
  if _standin_complete(manual_dir, num_images):
    return False
  write_images(shared_images, num_images, processes)
  image_dir = os.path.join(manual_dir, "flickr30k-images")
  os.makedirs(image_dir, exist_ok=True)
  sizes, fillers = split_sizes(num_images), filler_vocabulary()
  split_of = np.repeat(list(sizes), list(sizes.values()))
  kinds = np.random.default_rng([SEED, 2]).choice(len(KINDS), size=num_images, p=KIND_WEIGHTS)
  for start in np.cumsum([0, *sizes.values()])[:-1]:
    kinds[start:start + len(KINDS)] = np.arange(len(KINDS))  # every split holds every kind: every task
  entries = []
  for i in range(num_images):
    name = image_name(i)
    if not os.path.exists(os.path.join(image_dir, name)):
      os.link(os.path.join(shared_images, name), os.path.join(image_dir, name))
    texts = captions(np.random.default_rng([SEED, 4, i]), KINDS[kinds[i]], fillers)
    entries.append({"filename": name, "imgid": i, "split": str(split_of[i]), "sentids": list(range(5 * i, 5 * i + 5)),
                    "sentences": [{"raw": text, "sentid": 5 * i + j, "imgid": i, "tokens": text[:-1].split()}
                                  for j, text in enumerate(texts)]})
  json_path = os.path.join(manual_dir, "dataset_flickr30k.json")
  with open(json_path + ".tmp", "w", encoding="utf-8") as f:
    json.dump({"images": entries, "dataset": "flickr30k"}, f)
  os.rename(json_path + ".tmp", json_path)
  return True


def rss_mb() -> float:
  """This process's resident memory now (``VmRSS``), MB."""
  with open("/proc/self/status", encoding="utf-8") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def smaps_rss_mb(pid: int | str, under: str) -> tuple[float, float]:
  """``(RSS, resident pages of its mappings of the file or folder under)`` of a process (``"self"``), MB.

  Read from ``/proc/PID/smaps``; ``(0, 0)`` once the process is gone.
  """
  under = os.path.realpath(under)
  total = matched = 0
  inside = False
  try:
    with open(f"/proc/{pid}/smaps", encoding="utf-8") as f:
      for line in f:
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header: address range, perms, offset, dev, inode[, path]
          inside = len(fields) >= 6 and (fields[5] == under or fields[5].startswith(under + os.sep))
        elif fields[0] == "Rss:":
          total += int(fields[1])
          matched += int(fields[1]) if inside else 0
  except OSError:
    pass
  return total / 1024, matched / 1024


def prepare_worker(manual_dir: str, data_dir: str):
  """Builds the stand-in's TFDS files in this fresh process: ``({seconds, peak_mb}, run)``."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow  # noqa: F401  (imported before the clock starts, as by the command's start-up)
  import tensorflow_datasets as tfds
  from ccmr_jax.data import flickr30k_builder, prepare  # noqa: F401  (the builder registers itself)
  tfds.disable_progress_bar()
  seconds = common.timed(lambda: prepare.prepare("flickr30k", data_dir, manual_dir))
  return {"seconds": seconds, "peak_mb": peak_rss_mb()}, lambda: None


def run_config(settings: dict):
  """``configs/flickr.py`` on the stand-in's TFDS files, in ``settings["dtype"]``, with the chosen model."""
  from configs import flickr
  config = flickr.get_config()
  config.data.update(tfds_data_dir=settings["data_dir"], cache_dir=settings["cache_dir"])
  config.model.dtype = settings["dtype"]
  if settings["model"] == "tiny":  # the tests' tiny towers (tests/test_flickr30k.py)
    config.model.update(embed_dim=16)
    config.model.resnet.update(stage_sizes=(1,), width=4, groups=2)
    config.model.transformer.update(width=16, depth=1, heads=2)
  config.train.batch_size = settings["pipeline_batch"]
  return config


def pipeline_stage(config, max_batches: int) -> tuple[dict, object, object]:
  """Builds the cache, then draws the batches of one epoch; returns ``(results, sampler, tokenizer)``."""
  from ccmr_jax.data import sources
  from ccmr_jax.data.batches import PairSampler
  from ccmr_jax.data.task_split import split_into_tasks
  from ccmr_jax.data.tokenizer import build_tokenizer
  started = time.perf_counter()
  dataset = sources.load_dataset(config)
  out = {"cache_s": time.perf_counter() - started, "cache_peak_mb": peak_rss_mb(), "after_cache_mb": rss_mb()}
  cache_file = dataset.splits["train"].images.store.filename
  out["cache_gb"] = sum(os.path.getsize(os.path.join(os.path.dirname(cache_file), name))
                        for name in os.listdir(os.path.dirname(cache_file))) / 1e9
  stream = split_into_tasks(dataset, config.data.num_tasks, config.data.unlabeled)
  tokenizer = build_tokenizer(stream.tasks[0].splits["train"].captions, config.tokenizer.max_length,
                              config.tokenizer.num_oov_buckets, config.tokenizer.min_count)
  sampler = PairSampler.create(stream.training_data(range(len(stream))), tokenizer)
  steps = sampler.steps_per_epoch(config.train.batch_size)
  steps = min(steps, max_batches) if max_batches else steps
  before_mb, pages_before_mb = rss_mb(), smaps_rss_mb("self", cache_file)[1]

  def draw():
    batches = sampler.epoch(config.train.batch_size, config.seed, 0, 0)
    for _ in itertools.islice(batches, steps):
      pass
    batches.close()

  seconds = common.timed(draw)
  pages_mb = smaps_rss_mb("self", cache_file)[1]
  out.update(pipeline_pairs_s=steps * config.train.batch_size / seconds, before_pipeline_mb=before_mb,
             cache_pages_mb=pages_mb, pipeline_growth_mb=rss_mb() - before_mb - (pages_mb - pages_before_mb),
             train_images=len(sampler.examples), tasks=len(stream))
  return out, sampler, tokenizer


def step_stage(config, sampler, tokenizer, batch_size: int, rounds: int) -> dict:
  """Seconds per training step of the config's model on one real batch: the median of ``rounds`` steps."""
  import jax
  from ccmr_jax import sharding, train
  from ccmr_jax.models.dual_encoder import build_model
  mesh = sharding.make_mesh()
  model = build_model(config.model, tokenizer.vocab_size, tokenizer.max_length)
  optimizer = train.make_optimizer(config.train)
  step_fn = train.make_train_step(train.make_loss_fn(model, config.loss), optimizer, mesh)
  state = train.init_state(train.init_params(model, config.seed, config.data.image_size, tokenizer.max_length, mesh),
                           optimizer, mesh)
  batches = sampler.epoch(batch_size, config.seed, 0, 0)
  batch = sharding.to_global(next(batches), mesh)
  batches.close()
  learning_rate = np.float32(config.train.learning_rate)

  def step():
    nonlocal state
    state, metrics = step_fn(state, batch, learning_rate, None)
    jax.block_until_ready((state, metrics))

  compile_s = common.timed(step)
  step_s = common.median([common.timed(step) for _ in range(rounds)])
  return {"compile_s": compile_s, "step_s": step_s, "step_pairs_s": batch_size / step_s}


def run_worker(settings: dict):
  """The cache, pipeline and step stages in this fresh process: ``(results, run)``."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  out = {"start_mb": rss_mb()}
  import tensorflow  # noqa: F401  (imported here to measure it: the cache build imports it)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  out["tf_mb"] = rss_mb()
  import jax
  jax.devices()
  out["jax_mb"] = rss_mb()
  config = run_config(settings)
  results, sampler, tokenizer = pipeline_stage(config, settings["pipeline_batches"])
  out.update(results)
  out.update(step_stage(config, sampler, tokenizer, settings["step_batch"], settings["rounds"]))
  out["peak_mb"] = peak_rss_mb()
  return out, lambda: None


TINY_FLICKR_CONFIG = """from configs import flickr


def get_config():
  config = flickr.get_config()
  config.model.update(embed_dim=16, dtype="float32")
  config.model.resnet.update(stage_sizes=(1,), width=4, groups=2)
  config.model.transformer.update(width=16, depth=1, heads=2)
  config.train.update(epochs_per_task=1, log_every=100, checkpoint_every=0)
  return config
"""


def full_run(folder: str, data_dir: str, cache_dir: str, batch_size: int) -> dict:
  """``python -m ccmr_jax.main`` on the stand-in: configs/flickr.py, tiny towers, 1 epoch per task, ``batch_size``.

  The run's memory is sampled every second from ``/proc/PID/smaps``: the
  peak RSS, and the peak of RSS minus the resident pages of the image cache
  (clean file pages the kernel can drop): what the run itself holds.
  """
  config_path = os.path.join(folder, "flickr_tiny.py")
  with open(config_path, "w", encoding="utf-8") as f:
    f.write(TINY_FLICKR_CONFIG)
  workdir = os.path.join(folder, "work")
  shutil.rmtree(workdir, ignore_errors=True)
  command = [sys.executable, "-m", "ccmr_jax.main", f"--config={config_path}", f"--workdir={workdir}",
             f"--config.data.tfds_data_dir={data_dir}", f"--config.data.cache_dir={cache_dir}",
             f"--config.train.batch_size={batch_size}"]
  started = time.perf_counter()
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  peak = above_cache = cache_at_peak = 0.0
  while process.poll() is None:
    rss, cache = smaps_rss_mb(process.pid, cache_dir)
    if rss > peak:
      peak, cache_at_peak = rss, cache
    above_cache = max(above_cache, rss - cache)
    time.sleep(1.0)
  stderr = process.stderr.read()
  if process.returncode:
    raise RuntimeError(f"the run failed ({process.returncode}):\n{stderr[-3000:]}")
  shutil.rmtree(workdir, ignore_errors=True)
  return {"run_s": time.perf_counter() - started, "run_peak_mb": peak, "run_cache_at_peak_mb": cache_at_peak,
          "run_above_cache_mb": above_cache}


def measure_size(num_images: int, args: argparse.Namespace) -> dict:
  """Writes or reuses the stand-in, then prepares, caches, draws and steps in fresh processes."""
  folder = os.path.join(os.path.expanduser(args.root), f"flickr30k-{num_images}")
  manual_dir, data_dir, cache_dir = (os.path.join(folder, name) for name in ("manual", "tfds", "cache"))
  started = time.perf_counter()
  wrote = write_standin(manual_dir, num_images, os.path.join(os.path.expanduser(args.root), "images"),
                        common.available_cores())
  print(f"{num_images} images: stand-in {'written' if wrote else 'reused'} in {manual_dir} "
        f"({time.perf_counter() - started:.0f} s)", flush=True)
  for path in (data_dir, cache_dir):
    shutil.rmtree(path, ignore_errors=True)
  try:
    with common.Worker(prepare_worker, manual_dir, data_dir) as worker:
      prepared = worker.info
    settings = {"data_dir": data_dir, "cache_dir": cache_dir, "dtype": args.dtype, "model": args.model,
                "pipeline_batch": args.pipeline_batch, "pipeline_batches": args.pipeline_batches,
                "step_batch": args.step_batch, "rounds": args.rounds}
    with common.Worker(run_worker, settings) as worker:
      run = worker.info
    if args.full_run:
      run.update(full_run(folder, data_dir, cache_dir, args.pipeline_batch if not args.quick else 2))
  finally:
    for path in (data_dir, cache_dir):
      shutil.rmtree(path, ignore_errors=True)
  return {"images": num_images, "splits": split_sizes(num_images), "prepare": prepared, "run": run}


def throughput_row(m: dict, cores: int) -> list:
  run, n = m["run"], m["images"]
  return [n, "/".join(str(v) for v in m["splits"].values()), n / m["prepare"]["seconds"], n / run["cache_s"],
          run["cache_gb"], run["pipeline_pairs_s"], run["pipeline_pairs_s"] / cores, run["compile_s"],
          run["step_s"], run["step_pairs_s"]]


def memory_row(m: dict) -> list:
  run = m["run"]
  return [m["images"], m["prepare"]["peak_mb"], run["start_mb"], run["tf_mb"], run["jax_mb"], run["cache_peak_mb"],
          run["after_cache_mb"], run["before_pipeline_mb"], run["cache_pages_mb"], run["pipeline_growth_mb"],
          run["peak_mb"]]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", default="3000,10000,31783", help="comma-separated stand-in sizes")
  parser.add_argument("--root", default="~/.cache/ccmr_jax/real_size", help="where stand-ins and caches live")
  parser.add_argument("--model", default="flickr", choices=("flickr", "tiny"),
                      help="configs/flickr.py's ResNet-50 + Transformer, or the tests' tiny towers")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype of the step (configs/flickr.py's own is bfloat16)")
  parser.add_argument("--step_batch", type=int, default=16, help="batch of the timed training step")
  parser.add_argument("--pipeline_batch", type=int, default=128, help="batch of the pipeline (the config's)")
  parser.add_argument("--pipeline_batches", type=int, default=0, help="batches drawn (0: one whole epoch)")
  parser.add_argument("--full_run", action="store_true",
                      help="also run python -m ccmr_jax.main (flickr.py, tiny towers, 1 epoch per task) and sample "
                           "its memory")
  common.add_common_flags(parser)
  args = parser.parse_args(argv)
  if args.quick:
    args.images, args.model, args.step_batch, args.pipeline_batch, args.rounds = "40", "tiny", 8, 8, 1
  sizes = [int(n) for n in args.images.split(",")]
  for n in sizes:
    try:
      train_images = split_sizes(n)["train"]
    except ValueError as e:
      parser.error(str(e))
    if train_images < max(args.pipeline_batch, args.step_batch):
      parser.error(f"--images={n} has {train_images} training images, fewer than a batch "
                   f"(--pipeline_batch={args.pipeline_batch}, --step_batch={args.step_batch})")
  common.print_header("Flickr30K's path at real size: prepare, cache, pipeline, step, memory", argv)
  cores = common.available_cores()
  measured = [measure_size(n, args) for n in sizes]
  print(f"\nthroughput: pipeline = {args.pipeline_batch}-pair batches on decode_ahead's 4 threads + the main "
        f"thread, per core = ÷ {cores} cores; step = {args.model} model, batch {args.step_batch}, {args.dtype}, "
        f"median of {args.rounds}")
  print(common.markdown_table(THROUGHPUT_COLUMNS, [throughput_row(m, cores) for m in measured]))
  print("\nhost memory, MB: prepare's process, then the run's process stage by stage")
  print(common.markdown_table(MEMORY_COLUMNS, [memory_row(m) for m in measured]))
  if args.full_run:
    print("\nthe whole run (python -m ccmr_jax.main, configs/flickr.py with tiny towers, 1 epoch per task), "
          "sampled every second, MB")
    print(common.markdown_table(RUN_COLUMNS, [[m["images"], m["run"]["run_s"], m["run"]["run_peak_mb"],
                                               m["run"]["run_cache_at_peak_mb"], m["run"]["run_above_cache_mb"]]
                                              for m in measured]))


if __name__ == "__main__":
  main()
