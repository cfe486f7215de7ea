"""The embedded default dataset: captioned synthetic scenes, no download.

Each image is a 64x64 RGB scene with 1-3 coloured shapes on a noisy dark
background, rendered with numpy from a seed. Each image gets 5 different
captions drawn from varied templates and synonyms that mention shape, colour,
size, position and spatial relations, and carries its objects' category ids
(one per object, as COCO's ``objects.label``).

The 20 shape categories come in 5 families (the analogue of COCO's
supercategories), and each family has its own palette of six colour names. A
scene is drawn around one family: each object belongs to it with probability
``in_family_prob``, otherwise to another family. The task splitter then cuts
tasks by family, so tasks share words and skills (sizes, positions,
relations, sentence structure, edges and blobs) while each task's
fine-grained shapes and colour names are its own: learning a new task moves
the shared features that the old tasks' distinctions rest on.
Every caption names every object by colour and shape (sizes, positions and
relations vary), so retrieval within a task turns on attribute binding;
scenes that differ only in an object's colour, size or place are common, and
identical captions of different images do occur: the ground truth in
:mod:`ccmr_jax.evaluate` handles them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ccmr_jax.data.examples import Dataset, Examples

# family -> [(category name, synonyms used in captions)]
SHAPE_FAMILIES: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "round": [("circle", ("circle", "disc")), ("ellipse", ("ellipse", "oval")),
              ("ring", ("ring", "hoop")), ("half_disc", ("half disc", "semicircle"))],
    "boxy": [("square", ("square", "box")), ("rectangle", ("rectangle", "slab")),
             ("frame", ("frame", "hollow square")), ("diamond", ("diamond", "rhombus"))],
    "pointed": [("triangle", ("triangle", "wedge")), ("inverted_triangle", ("upside down triangle", "inverted triangle")),
                ("star", ("star", "starburst")), ("hourglass", ("hourglass", "bow tie"))],
    "lines": [("plus", ("plus", "cross")), ("x_mark", ("x mark", "saltire")),
              ("horizontal_bar", ("horizontal bar", "flat bar")), ("vertical_bar", ("vertical bar", "upright bar"))],
    "symbols": [("heart", ("heart", "love heart")), ("crescent", ("crescent", "moon")),
                ("hexagon", ("hexagon", "six sided shape")), ("arrow", ("arrow", "pointer"))],
}

# Each family has its own palette of fine-grained colour names, as each COCO
# supercategory brings its own fine-grained vocabulary (breeds, makes, dishes):
# telling "teal" from "cyan" is knowledge of the cool-palette task alone.
FAMILY_PALETTES: dict[str, dict[str, tuple[int, int, int]]] = {
    "round": {"red": (215, 35, 35), "orange": (245, 135, 25), "yellow": (235, 215, 40),
              "brown": (130, 75, 30), "pink": (245, 130, 190), "maroon": (115, 15, 45)},
    "boxy": {"blue": (40, 70, 225), "navy": (20, 25, 110), "cyan": (40, 205, 215),
             "teal": (20, 125, 125), "sky blue": (130, 185, 250), "indigo": (85, 40, 170)},
    "pointed": {"green": (40, 185, 60), "lime": (170, 235, 40), "olive": (110, 120, 30),
                "mint": (150, 240, 190), "forest green": (20, 90, 40), "jade": (0, 160, 110)},
    "lines": {"purple": (150, 60, 210), "violet": (205, 120, 245), "magenta": (230, 40, 200),
              "lavender": (200, 180, 240), "plum": (110, 40, 90), "mauve": (175, 125, 160)},
    "symbols": {"white": (240, 240, 240), "silver": (185, 185, 195), "grey": (125, 125, 125),
                "cream": (240, 225, 165), "slate": (95, 115, 140), "khaki": (165, 155, 100)},
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
COUNT_WORDS = ("one", "two", "three")


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Region of a unit-radius shape in coordinates (u right, v down)."""
  rho = np.sqrt(u * u + v * v)
  if name == "circle":
    return rho <= 1.0
  if name == "ellipse":
    return u * u + v * v / 0.3 <= 1.0
  if name == "ring":
    return (rho <= 1.0) & (rho >= 0.55)
  if name == "half_disc":
    return (rho <= 1.0) & (v <= 0.1)
  if name == "square":
    return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
  if name == "rectangle":
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.45)
  if name == "frame":
    box = np.maximum(np.abs(u), np.abs(v))
    return (box <= 0.85) & (box >= 0.5)
  if name == "diamond":
    return np.abs(u) + np.abs(v) <= 1.0
  if name == "triangle":
    return (v <= 0.8) & (np.abs(u) <= 0.5 * (v + 1.0))
  if name == "inverted_triangle":
    return (v >= -0.8) & (np.abs(u) <= 0.5 * (1.0 - v))
  if name == "star":
    theta = np.arctan2(v, u)
    return rho <= 0.4 + 0.6 * ((np.cos(5 * theta + np.pi / 2) + 1) / 2) ** 2
  if name == "hourglass":
    return (np.abs(v) <= 0.95) & (np.abs(u) <= np.abs(v) + 0.08)
  if name == "plus":
    return ((np.abs(u) <= 0.25) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.25) & (np.abs(u) <= 1.0))
  if name == "x_mark":
    return ((np.abs(u - v) <= 0.35) | (np.abs(u + v) <= 0.35)) & (np.maximum(np.abs(u), np.abs(v)) <= 0.85)
  if name == "horizontal_bar":
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.22)
  if name == "vertical_bar":
    return (np.abs(u) <= 0.22) & (np.abs(v) <= 1.0)
  if name == "heart":
    x, y = u * 1.15, -v * 1.15 + 0.15
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
  if name == "crescent":
    return (rho <= 1.0) & ((u - 0.45) ** 2 + (v + 0.1) ** 2 > 0.75 ** 2)
  if name == "hexagon":
    return (np.abs(v) <= 0.87) & (np.abs(u) * 0.87 + np.abs(v) * 0.5 <= 0.87)
  if name == "arrow":
    stem = (u >= -1.0) & (u <= 0.1) & (np.abs(v) <= 0.2)
    head = (u >= 0.0) & (u <= 1.0) & (np.abs(v) <= 0.75 * (1.0 - u))
    return stem | head
  raise ValueError(f"unknown shape {name!r}")


@dataclasses.dataclass(frozen=True)
class SceneSpec:
  """How many scenes to make and how they look.

  Attributes:
    num_train / num_val / num_test: images per split (all families together).
    image_size: side of the square images in pixels.
    in_family_prob: probability that an object is of the scene's family.
    seed: everything is a deterministic function of this seed.
  """

  num_train: int = 6000
  num_val: int = 500
  num_test: int = 1000
  image_size: int = 64
  in_family_prob: float = 0.9
  seed: int = 0


def category_table() -> tuple[tuple[str, ...], dict[str, tuple[int, ...]], list[tuple[str, ...]]]:
  """(category names, family -> category ids, synonyms per category id)."""
  names, groups, synonyms = [], {}, []
  for family, shapes in SHAPE_FAMILIES.items():
    ids = []
    for name, syn in shapes:
      ids.append(len(names))
      names.append(name)
      synonyms.append(syn)
    groups[family] = tuple(ids)
  return tuple(names), groups, synonyms


@dataclasses.dataclass
class _Object:
  category: int
  family: str
  colour: str
  size: str
  radius: float
  cx: float
  cy: float


def _pick(rng: np.random.Generator, options):
  """One element of ``options``, uniformly (faster than ``rng.choice``)."""
  return options[int(rng.integers(len(options)))]


def _position_phrase(obj: _Object, image_size: int, rng: np.random.Generator) -> str:
  dx, dy = obj.cx - image_size / 2, obj.cy - image_size / 2
  if max(abs(dx), abs(dy)) < image_size / 8:
    return _pick(rng, ["in the center", "in the middle"])
  if abs(dx) >= abs(dy):
    return "on the left" if dx < 0 else "on the right"
  return _pick(rng, ["at the top", "near the top"]) if dy < 0 else _pick(rng, ["at the bottom", "near the bottom"])


def _relation(a: _Object, b: _Object) -> str:
  dx, dy = b.cx - a.cx, b.cy - a.cy
  if abs(dx) >= abs(dy):
    return "to the left of" if dx > 0 else "to the right of"
  return "above" if dy > 0 else "below"


def _article(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


class _Captioner:
  """Writes varied captions for one scene."""

  def __init__(self, objects: list[_Object], synonyms, image_size: int, rng: np.random.Generator):
    self.objects, self.synonyms, self.size, self.rng = objects, synonyms, image_size, rng

  def noun(self, o: _Object) -> str:
    return _pick(self.rng, self.synonyms[o.category])

  def phrase(self, o: _Object, with_size: bool, with_colour: bool = True) -> str:
    words = []
    if with_size:
      words.append(_pick(self.rng, SIZE_WORDS[o.size]))
    if with_colour:
      words.append(o.colour)
    words.append(self.noun(o))
    return " ".join(words)

  def listing(self, objects: list[_Object], with_position: bool = False) -> str:
    """Every object as "[size] colour shape [position]", joined as a list."""
    parts = []
    for o in objects:
      text = _article(self.phrase(o, with_size=bool(self.rng.integers(2))))
      if with_position:
        text += " " + _position_phrase(o, self.size, self.rng)
      parts.append(text)
    if len(parts) == 1:
      return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]

  def one(self) -> str:
    """One caption that names every object (colour and shape, sometimes size and place)."""
    rng = self.rng
    objs = [self.objects[i] for i in rng.permutation(len(self.objects))]
    kinds = ["list", "there_is", "picture", "positions", "count"]
    if len(objs) >= 2:
      kinds += ["relation", "relation"]
    kind = kinds[rng.integers(len(kinds))]
    if kind == "list":
      return self.listing(objs)
    if kind == "there_is":
      return "there is " + self.listing(objs)
    if kind == "picture":
      return _pick(rng, ["a picture of ", "an image of ", "a scene with "]) + self.listing(objs)
    if kind == "positions":
      return self.listing(objs, with_position=True)
    if kind == "count":
      what = "shape" if len(objs) == 1 else "shapes"
      return f"{COUNT_WORDS[len(objs) - 1]} {what}: " + self.listing(objs)
    a, b = objs[0], objs[1]
    text = f"{_article(self.phrase(a, with_size=bool(rng.integers(2))))} {_relation(a, b)} " \
           f"{_article(self.phrase(b, with_size=bool(rng.integers(2))))}"
    return text + (" and " + self.listing(objs[2:]) if len(objs) > 2 else "")

  def captions(self, count: int) -> list[str]:
    out: list[str] = []
    for _ in range(50 * count):
      text = self.one()
      if text not in out:
        out.append(text)
      if len(out) == count:
        return out
    raise RuntimeError("could not write enough different captions")  # unreachable with these templates


def _place(rng, image_size, categories, category_family) -> list[_Object]:
  objects: list[_Object] = []
  for category in categories:
    for _ in range(100):
      size = "small" if rng.random() < 0.5 else "large"
      radius = rng.uniform(5.0, 7.5) if size == "small" else rng.uniform(10.0, 13.0)
      cx, cy = rng.uniform(radius + 1, image_size - radius - 1, size=2)
      if all(np.hypot(cx - o.cx, cy - o.cy) > 0.9 * (radius + o.radius) for o in objects):
        break
    family = category_family[category]
    colour = _pick(rng, list(FAMILY_PALETTES[family]))
    objects.append(_Object(int(category), family, colour, size, radius, cx, cy))
  return objects


def _render(objects: list[_Object], image_size: int, rng: np.random.Generator, names) -> np.ndarray:
  base = rng.uniform(15, 70)
  image = base + rng.normal(0.0, 7.0, size=(image_size, image_size, 3)).astype(np.float32)
  for o in objects:
    # Only the object's bounding box is evaluated: shapes fit in radius 1.
    x0, x1 = max(int(o.cx - o.radius) - 1, 0), min(int(o.cx + o.radius) + 2, image_size)
    y0, y1 = max(int(o.cy - o.radius) - 1, 0), min(int(o.cy + o.radius) + 2, image_size)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    mask = _shape_mask(names[o.category], (xx - o.cx) / o.radius, (yy - o.cy) / o.radius)
    colour = np.clip(np.asarray(FAMILY_PALETTES[o.family][o.colour], np.float32) + rng.normal(0, 8, size=3), 0, 255)
    image[y0:y1, x0:x1][mask] = colour
  return np.clip(image, 0, 255).astype(np.uint8)


def _make_split(spec: SceneSpec, count: int, split_index: int, captions_per_image: int = 5) -> Examples:
  names, groups, synonyms = category_table()
  families = list(groups.values())
  category_family = {c: family for family, ids in groups.items() for c in ids}
  rng = np.random.default_rng([spec.seed, split_index])
  images, captions, caption_image, labels = [], [], [], []
  for row in range(count):
    family = int(rng.integers(len(families)))
    num_objects = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    cats = []
    for _ in range(num_objects):
      if rng.random() < spec.in_family_prob:
        cats.append(_pick(rng, families[family]))
      else:
        other = _pick(rng, [f for f in range(len(families)) if f != family])
        cats.append(_pick(rng, families[other]))
    objects = _place(rng, spec.image_size, cats, category_family)
    images.append(_render(objects, spec.image_size, rng, names))
    for text in _Captioner(objects, synonyms, spec.image_size, rng).captions(captions_per_image):
      captions.append(text)
      caption_image.append(row)
    labels.append(np.asarray(cats, np.int32))
  return Examples(
      images=np.stack(images),
      image_ids=np.arange(count, dtype=np.int64) + split_index * 10_000_000,
      captions=tuple(captions),
      caption_image=np.asarray(caption_image, np.int64),
      labels=tuple(labels),
  )


def make_split(spec: SceneSpec, split: str) -> Examples:
  """One split of :func:`make_scenes` alone, the same images and captions (each split has its own generator)."""
  counts = {"train": spec.num_train, "val": spec.num_val, "test": spec.num_test}
  return _make_split(spec, counts[split], list(counts).index(split))


def make_scenes(spec: SceneSpec) -> Dataset:
  """Generates the three splits of the synthetic scenes dataset.

  Args:
    spec: sizes, image size, family purity and seed.

  Returns:
    A :class:`Dataset` whose category groups are the 5 shape families.
  """
  names, groups, _ = category_table()
  counts = {"train": spec.num_train, "val": spec.num_val, "test": spec.num_test}
  for split, n in counts.items():
    if n <= 0:
      raise ValueError(f"scenes.num_{split} must be positive, got {n}")
  splits = {split: _make_split(spec, n, i) for i, (split, n) in enumerate(counts.items())}
  return Dataset(name="scenes", splits=splits, category_names=names, category_groups=groups)
