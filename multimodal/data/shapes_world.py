"""The shapes world: a procedural image-text dataset with known ground truth.

A scene holds 1 to 3 coloured shapes on a dark, lightly noisy background, each
in its own cell of a 3x3 grid. Every image comes with captions, question/answer
pairs, and per-object labels and boxes. Because everything is generated, a model
trained on it can be checked against the truth, and 8 (shape, colour) pairs are
held out of train/validation/test to measure compositional generalisation.

Pure numpy (no TF) so it can run in worker processes and in tests cheaply.
"""
from __future__ import annotations

import functools
import struct
import zlib

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond",
          "hexagon")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple",
           "white")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
SPLITS = ("train", "validation", "test", "test_novel")
NUMBER_WORDS = ("zero", "one", "two", "three")

# Chosen to stay distinct from each other and from the dark grey background.
COLOUR_RGB = {
    "red": (230, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 235, 40),
    "green": (30, 190, 50),
    "cyan": (40, 225, 235),
    "blue": (40, 80, 255),
    "purple": (170, 50, 230),
    "white": (245, 245, 245),
}

# Shape i is held out with colour (3i+1) % 8: a permutation, so every shape and
# every colour is seen in training, just never in these combinations.
NOVEL_COLOUR_OF_SHAPE = tuple((3 * i + 1) % len(COLOURS)
                              for i in range(len(SHAPES)))
NOVEL_PAIRS = tuple((SHAPES[i], COLOURS[c])
                    for i, c in enumerate(NOVEL_COLOUR_OF_SHAPE))

# Object diameter as a fraction of the grid cell.
# Single objects are the most common scenes: they teach attributes fastest
# (no binding of colour to shape across objects), and zero-shot evaluation
# classifies them.
NUM_OBJECTS_PROBABILITIES = (0.5, 0.3, 0.2)
SIZE_FRACTION = {"small": 0.5, "large": 0.8}
_SUPERSAMPLE = 4  # Sub-pixel samples per axis for anti-aliased edges.


# ----------------------------------------------------------------- geometry --
def _polygon_contains(x, y, vertices):
  """Even-odd rule point-in-polygon, vectorised over the points (x, y)."""
  inside = np.zeros(x.shape, bool)
  vx, vy = np.asarray(vertices, np.float64).T
  for i in range(len(vx)):
    x0, y0, x1, y1 = vx[i - 1], vy[i - 1], vx[i], vy[i]
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
      x_at_y = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    inside ^= crosses & (x < x_at_y)
  return inside


def _regular_polygon(n, radius, start_angle):
  angles = start_angle + 2 * np.pi * np.arange(n) / n
  return np.stack([radius * np.cos(angles), radius * np.sin(angles)], -1)


def _inside(shape: str, x, y):
  """Whether the points lie in `shape`; coordinates in [-1, 1], y points down."""
  if shape == "circle":
    return x * x + y * y <= 0.98
  if shape == "square":  # Shrunk so its area is close to the circle's.
    return np.maximum(abs(x), abs(y)) <= 0.84
  if shape == "triangle":
    return _polygon_contains(x, y, [(0, -1), (1, 0.8), (-1, 0.8)])
  if shape == "star":
    outer = _regular_polygon(5, 1.0, -np.pi / 2)
    inner = _regular_polygon(5, 0.42, -np.pi / 2 + np.pi / 5)
    star = np.stack([outer, inner], 1).reshape(10, 2) + (0, 0.1)
    return _polygon_contains(x, y, star)
  if shape == "heart":
    # Classic implicit heart curve, flipped to y-down and fitted to the box.
    hx, hy = 1.15 * x, -1.15 * y + 0.1
    return (hx * hx + hy * hy - 1) ** 3 - hx * hx * hy ** 3 <= 0
  if shape == "cross":
    ax, ay = abs(x), abs(y)
    return ((ax <= 0.32) & (ay <= 0.95)) | ((ay <= 0.32) & (ax <= 0.95))
  if shape == "diamond":  # Narrower than a rotated square, like a card suit.
    return abs(x) / 0.72 + abs(y) <= 1.0
  if shape == "hexagon":
    return _polygon_contains(x, y, _regular_polygon(6, 1.0, 0.0))
  raise ValueError(f"unknown shape {shape!r}")


def _cell_edges(image_size: int) -> np.ndarray:
  return np.round(np.linspace(0, image_size, 4)).astype(int)


def object_diameter(size: str, image_size: int) -> int:
  # Below ~6 px a star, cross and diamond all look like the same blob, so small
  # images get a floor; it never exceeds the (smallest) cell.
  cell = int(np.diff(_cell_edges(image_size)).min())
  return min(cell, max(6, int(round(SIZE_FRACTION[size] * image_size / 3))))


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, size: str, image_size: int):
  """(alpha, tight_box) for one shape: alpha is float32 (d, d) in [0, 1] and
  tight_box = (row0, col0, row1, col1) bounds the non-zero alpha (exclusive)."""
  d = object_diameter(size, image_size)
  n = d * _SUPERSAMPLE
  coords = (np.arange(n) + 0.5) / n * 2 - 1
  y, x = np.meshgrid(coords, coords, indexing="ij")
  hits = _inside(shape, x, y).astype(np.float32)
  alpha = hits.reshape(d, _SUPERSAMPLE, d, _SUPERSAMPLE).mean((1, 3))
  rows = np.flatnonzero(alpha.any(1))
  cols = np.flatnonzero(alpha.any(0))
  alpha.setflags(write=False)  # Shared through the cache.
  return alpha, (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)


# ------------------------------------------------------------------- scenes --
def _sample_objects(rng: np.random.Generator, split: str) -> list[dict]:
  n = int(rng.choice([1, 2, 3], p=NUM_OBJECTS_PROBABILITIES))
  cells = rng.choice(len(POSITIONS), size=n, replace=False)
  novel_slot = int(rng.integers(n)) if split == "test_novel" else -1
  objects = []
  for k, cell in enumerate(cells):
    s = int(rng.integers(len(SHAPES)))
    if k == novel_slot:
      c = NOVEL_COLOUR_OF_SHAPE[s]
    elif split == "test_novel":
      c = int(rng.integers(len(COLOURS)))  # The other objects are unrestricted.
    else:
      # Uniform over the 7 colours allowed with this shape, without rejection.
      c = int(rng.integers(len(COLOURS) - 1))
      c += c >= NOVEL_COLOUR_OF_SHAPE[s]
    objects.append(dict(shape=SHAPES[s], colour=COLOURS[c],
                        size=SIZES[int(rng.integers(len(SIZES)))],
                        position=POSITIONS[int(cell)]))
  return objects


def render(objects: list[dict], rng: np.random.Generator, image_size: int):
  """Draws the objects; returns (uint8 image, float32 (n, 4) boxes yxyx)."""
  grey = rng.uniform(30, 50)
  image = np.full((image_size, image_size, 3), grey, np.float32)
  edges = _cell_edges(image_size)
  boxes = np.zeros((len(objects), 4), np.float32)
  for k, obj in enumerate(objects):
    alpha, (r0, c0, r1, c1) = shape_mask(obj["shape"], obj["size"], image_size)
    d = alpha.shape[0]
    row, col = divmod(POSITIONS.index(obj["position"]), 3)
    # Jitter stays inside the cell, so objects in distinct cells never overlap.
    y = int(rng.integers(edges[row], max(edges[row], edges[row + 1] - d) + 1))
    x = int(rng.integers(edges[col], max(edges[col], edges[col + 1] - d) + 1))
    patch = image[y:y + d, x:x + d]
    a = alpha[..., None]
    patch *= 1 - a
    patch += a * np.asarray(COLOUR_RGB[obj["colour"]], np.float32)
    boxes[k] = (y + r0, x + c0, y + r1, x + c1)
  image += rng.normal(0, 3.0, image.shape).astype(np.float32)
  image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
  return image, boxes / image_size


# ----------------------------------------------------------------- captions --
_POSITION_PHRASE = {
    "top left": "in the top left corner", "top": "at the top",
    "top right": "in the top right corner", "left": "on the left",
    "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}


def _a(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# How much of each object a caption names, like real alt-text, which often
# leaves an attribute out. Partial captions also matter for learning: when a
# caption names only the shape, colour cannot tell its image from the others
# in a batch, so a contrastive model has to see shape (with full captions
# alone, colour and position nearly always suffice and shape is never learnt).
DETAIL_PROBABILITIES = {"colour and shape": 0.4, "shape": 0.4, "colour": 0.2}

# Positions are named in a minority of captions: a named position almost
# always picks out its image on its own, so it too would spare the model from
# learning shape.
POSITION_PROBABILITY = 0.3


def _noun(obj: dict, with_size: bool, detail: str = "colour and shape") -> str:
  # When both are named, colour directly precedes shape ("red circle").
  core = {"colour and shape": f"{obj['colour']} {obj['shape']}",
          "shape": obj["shape"], "colour": f"{obj['colour']} shape"}[detail]
  return _a(f"{obj['size']} {core}" if with_size else core)


def _join(parts: list[str]) -> str:
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _list_templates(n: int) -> list[str]:
  nw = NUMBER_WORDS[n]
  things = "shape" if n == 1 else "shapes"
  return [
      "there is {}." if n == 1 else f"there are {nw} objects: {{}}.",
      "a photo of {}.",
      "an image showing {}.",
      "{} on a dark background.",
      f"a picture with {nw} {things}: {{}}.",
      "this image contains {}.",
      "we can see {}.",
      "a simple drawing of {}.",
      f"{nw} {things} on a dark background: {{}}.",
  ]


def make_captions(objects: list[dict], rng: np.random.Generator,
                  num: int = 3) -> list[str]:
  """`num` distinct-template captions.

  Every caption names every object, each by colour and shape or, in a
  partial caption, by only one of them (see DETAIL_PROBABILITIES).
  """
  templates = _list_templates(len(objects))
  sentences = len(templates)  # Extra template: one sentence per object.
  chosen = rng.choice(sentences + 1, size=num, replace=False)
  captions = []
  for t in chosen:
    order = rng.permutation(len(objects))
    with_size = bool(rng.random() < 0.5)
    with_pos = bool(rng.random() < POSITION_PROBABILITY)
    detail = str(rng.choice(list(DETAIL_PROBABILITIES),
                            p=list(DETAIL_PROBABILITIES.values())))
    if t == sentences:
      captions.append(" ".join(
          f"{_noun(objects[i], with_size, detail)} is "
          f"{_POSITION_PHRASE[objects[i]['position']]}." for i in order))
      continue
    parts = [_noun(objects[i], with_size, detail) +
             (" " + _POSITION_PHRASE[objects[i]["position"]] if with_pos else "")
             for i in order]
    captions.append(templates[t].format(_join(parts)))
  return captions


# ---------------------------------------------------------------- questions --
def _absent_pair(objects, rng, split):
  """A (colour, shape) not in the image, often a near miss of one that is."""
  present = {(o["colour"], o["shape"]) for o in objects}
  # Outside test_novel even the question text must not mention a held-out pair.
  allowed = lambda c, s: (c, s) not in present and (
      split == "test_novel" or (s, c) not in NOVEL_PAIRS)
  if rng.random() < 0.5:
    o = objects[int(rng.integers(len(objects)))]
    if rng.random() < 0.5:
      options = [(c, o["shape"]) for c in COLOURS if allowed(c, o["shape"])]
    else:
      options = [(o["colour"], s) for s in SHAPES if allowed(o["colour"], s)]
    if options:
      return options[int(rng.integers(len(options)))]
  options = [(c, s) for c in COLOURS for s in SHAPES if allowed(c, s)]
  return options[int(rng.integers(len(options)))]


def _is_there(colour, shape):
  return f"is there {_a(colour + ' ' + shape)}?"


def make_questions(objects: list[dict], rng: np.random.Generator,
                   split: str = "train"):
  """4 to 6 (question, answer) pairs, only about uniquely identified objects."""
  def count(key, value):
    return sum(o[key] == value for o in objects)

  pool = [("how many objects are there?", NUMBER_WORDS[len(objects)])]
  for o in objects:
    col, shp = o["colour"], o["shape"]
    if count("shape", shp) == 1:
      pool.append((f"what colour is the {shp}?", col))
    if count("colour", col) == 1:
      pool.append((f"what shape is the {col} object?", shp))
    if sum(p["colour"] == col and p["shape"] == shp for p in objects) == 1:
      pool.append((f"where is the {col} {shp}?", o["position"]))
      pool.append((f"what size is the {col} {shp}?", o["size"]))
  k = int(rng.integers(4, 7))
  num_yes_no = int(rng.integers(1, 3))
  picked = [pool[i] for i in rng.permutation(len(pool))[:k - num_yes_no]]
  asked = {q for q, _ in picked}
  # Yes/no questions fill up, alternating from a random start so "yes" and
  # "no" are balanced (a coin per question would lean "no": with few objects,
  # repeated "yes" questions get rejected as duplicates more often).
  yes = bool(rng.random() < 0.5)
  while len(picked) < k:
    unasked = [q for q in (_is_there(o["colour"], o["shape"]) for o in objects)
               if q not in asked]
    if yes and unasked:
      q, a = unasked[int(rng.integers(len(unasked)))], "yes"
    else:
      q, a = _is_there(*_absent_pair(objects, rng, split)), "no"
    if q not in asked:
      asked.add(q)
      picked.append((q, a))
      yes = not yes
  picked = [picked[i] for i in rng.permutation(len(picked))]
  return [q for q, _ in picked], [a for _, a in picked]


# ------------------------------------------------------------------ example --
def _png_chunk(tag: bytes, data: bytes) -> bytes:
  return (struct.pack(">I", len(data)) + tag + data +
          struct.pack(">I", zlib.crc32(tag + data)))


def png_bytes(image: np.ndarray) -> bytes:
  """Encodes a uint8 RGB image as PNG, ~3x faster than PIL.

  No row filters and zlib level 1: the background noise defeats PNG's filters
  and higher levels, so this is also smaller than PIL's default output.
  """
  h, w, _ = image.shape
  rows = np.zeros((h, 1 + 3 * w), np.uint8)  # Leading 0 = filter "none".
  rows[:, 1:] = image.reshape(h, 3 * w)
  header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB.
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) +
          _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) +
          _png_chunk(b"IEND", b""))


def generate_example(seed: int, split: str, index: int,
                     image_size: int = 64) -> dict:
  """Example `index` of `split`; depends only on (seed, split, index)."""
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  objects = _sample_objects(rng, split)
  image, boxes = render(objects, rng, image_size)
  captions = make_captions(objects, rng)
  questions, answers = make_questions(objects, rng, split)
  return {
      "image": image,
      "captions": captions,
      "objects": {
          "shape": [o["shape"] for o in objects],
          "colour": [o["colour"] for o in objects],
          "size": [o["size"] for o in objects],
          "position": [o["position"] for o in objects],
          "bbox": boxes,
      },
      "num_objects": len(objects),
      "questions": questions,
      "answers": answers,
  }


def render_grid(seed: int = 0, split: str = "train", rows: int = 4,
                cols: int = 8, image_size: int = 64, scale: int = 2,
                gap: int = 2) -> np.ndarray:
  """A uint8 mosaic of the first rows*cols examples, upscaled for viewing."""
  tile = image_size * scale
  grid = np.full((rows * (tile + gap) + gap, cols * (tile + gap) + gap, 3), 128,
                 np.uint8)
  for i in range(rows * cols):
    image = generate_example(seed, split, i, image_size)["image"]
    image = image.repeat(scale, 0).repeat(scale, 1)
    r, c = divmod(i, cols)
    y, x = gap + r * (tile + gap), gap + c * (tile + gap)
    grid[y:y + tile, x:x + tile] = image
  return grid
