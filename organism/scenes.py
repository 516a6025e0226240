"""Scene sampler, renderer and captioner of the model organism.

A scene is a scene type (background) plus 1 to 5 objects, each in its own cell of a 3 x 3 grid. Sampling is
deterministic given a `numpy.random.Generator`. The two splits differ only in their priors:

- train: a scene's co-occurrence group is present (p = 0.8) and then complete with p = 1 - TRAIN_BREAK, so the
  probability that all other members are present given one member is about 0.98; foreign objects (from another
  scene type) are rare and are always loose "single" objects, never group members.
- test: half of the scenes are traps (the group is present with exactly one member missing: the language prior
  says the missing member should be there), and 30 % hold an object of another scene type (a group member of
  another scene leaves its partners "expected by prior but absent" as well).

Each scene records `expected_absent` (group partners of a present object that are missing), `unusual` (objects
from another scene type) and `trap` (the scene's own group was broken on purpose).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from organism.vocab import CLASS_BY_NAME, CLASS_NAMES, COLOURS, GROUP_OF, SCENE_BY_NAME, SCENE_TYPES

SPLITS: tuple[str, ...] = ("train", "test")
GRID = 3  # the image is a GRID x GRID grid of cells, one object per cell
MAX_OBJECTS = 5

# Train priors.
TRAIN_GROUP_P = 0.8  # the scene's group appears
TRAIN_BREAK = 0.03  # ... and then one member is dropped (P(others | member) ~ 0.98)
TRAIN_SINGLE_P = 0.6  # the scene's single object appears
TRAIN_FOREIGN_P = 0.08  # a single object of another scene type appears
# Test priors.
TEST_TRAP_P = 0.5  # the scene's group appears with exactly one member missing
TEST_FULL_P = 0.6  # otherwise, the group appears complete
TEST_SINGLE_P = 0.5
TEST_FOREIGN_P = 0.3  # any object (group member or single) of another scene type appears

# Object geometry, in cell units: diameter fraction and centre jitter (|dx| <= JITTER keeps the object in its cell).
SCALE_RANGE = (0.66, 0.80)
JITTER = 0.05
SUPERSAMPLE = 4

# Caption templates: {scene} is the scene phrase ("a kitchen"), {objs} the object list ("a fork and a cup").
TEMPLATES: tuple[str, ...] = (
  "{scene} with {objs}.",
  "{objs} in {scene}.",
  "This is {scene} with {objs}.",
  "A photo of {scene} with {objs}.",
  "In {scene} there is {objs}.",
)
# The first template dominates the primary caption, so greedy decoding has one clear format to follow.
TEMPLATE_WEIGHTS: tuple[float, ...] = (0.6, 0.1, 0.1, 0.1, 0.1)


@dataclasses.dataclass(frozen=True)
class PlacedObject:
  """An object instance: class name, grid cell and geometry jitter (cell units)."""

  name: str
  row: int
  col: int
  dx: float
  dy: float
  scale: float


@dataclasses.dataclass(frozen=True)
class Scene:
  """One sampled scene.

  Attributes:
    scene_type: a scene type name (vocab.SCENE_TYPES).
    split: "train" or "test".
    objects: placed objects, in canonical (class id) order, at most one per class.
    expected_absent: class names that the co-occurrence prior predicts but that are absent (class id order).
    unusual: present class names that belong to another scene type.
    trap: True when the scene's own group was deliberately broken.
    noise_seed: seed of the background noise.
    brightness: background brightness offset (RGB units).
  """

  scene_type: str
  split: str
  objects: tuple[PlacedObject, ...]
  expected_absent: tuple[str, ...]
  unusual: tuple[str, ...]
  trap: bool
  noise_seed: int
  brightness: float

  @property
  def names(self) -> tuple[str, ...]:
    """Class names of the objects, in canonical order."""
    return tuple(o.name for o in self.objects)

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable form."""
    d = dataclasses.asdict(self)
    d["objects"] = [dataclasses.asdict(o) for o in self.objects]
    d["expected_absent"] = list(self.expected_absent)
    d["unusual"] = list(self.unusual)
    return d


def _order(names: Sequence[str]) -> list[str]:
  return sorted(set(names), key=CLASS_NAMES.index)


def expected_absent(names: Sequence[str]) -> tuple[str, ...]:
  """Group partners of present objects that are absent (what the co-occurrence prior predicts wrongly)."""
  present = set(names)
  missing = {m for n in present for m in GROUP_OF.get(n, ()) if m not in present}
  return tuple(_order(missing))


def sample_scene(rng: np.random.Generator, split: str) -> Scene:
  """Samples one scene.

  Args:
    rng: random generator (consumed).
    split: "train" or "test".

  Returns:
    The scene.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  st = SCENE_TYPES[int(rng.integers(len(SCENE_TYPES)))]
  others = [s for s in SCENE_TYPES if s.name != st.name]
  names: list[str] = []
  trap = False
  if split == "train":
    if rng.random() < TRAIN_GROUP_P:
      group = list(st.group)
      if rng.random() < TRAIN_BREAK:
        group.pop(int(rng.integers(len(group))))
      names += group
    if rng.random() < TRAIN_SINGLE_P:
      names.append(st.single)
    if rng.random() < TRAIN_FOREIGN_P:
      names.append(others[int(rng.integers(len(others)))].single)
  else:
    if rng.random() < TEST_TRAP_P:
      group = list(st.group)
      group.pop(int(rng.integers(len(group))))
      names += group
      trap = True
    elif rng.random() < TEST_FULL_P:
      names += st.group
    if rng.random() < TEST_SINGLE_P:
      names.append(st.single)
    if rng.random() < TEST_FOREIGN_P:
      pool = [n for s in others for n in (*s.group, s.single)]
      names.append(pool[int(rng.integers(len(pool)))])
  if not names:
    names.append(st.single)
  names = _order(names)
  assert 1 <= len(names) <= MAX_OBJECTS, names
  return place_scene(rng, st, names, split, trap)


def place_scene(rng: np.random.Generator, st, names: list[str], split: str, trap: bool) -> Scene:
  """The Scene of scene type `st` holding `names` (already ordered): grid cells, jitter, scale, noise, brightness
  drawn from `rng` in that order (v1 and v2 scenes share it, so their draws stay reproducible)."""
  cells = rng.permutation(GRID * GRID)[:len(names)]
  objects = []
  for name, cell in zip(names, cells):
    dx, dy = rng.uniform(-JITTER, JITTER, size=2)
    scale = rng.uniform(*SCALE_RANGE)
    objects.append(PlacedObject(name, int(cell) // GRID, int(cell) % GRID, float(dx), float(dy), float(scale)))
  return Scene(
    scene_type=st.name, split=split, objects=tuple(objects), expected_absent=expected_absent(names),
    unusual=tuple(n for n in names if CLASS_BY_NAME[n].scene != st.name), trap=trap,
    noise_seed=int(rng.integers(2**31)), brightness=float(rng.uniform(-6.0, 6.0)))


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Inside-test of a shape in local coordinates (u right, v down, the shape fits in [-1, 1]^2)."""
  au, av = np.abs(u), np.abs(v)
  if shape == "circle":
    return u * u + v * v <= 1.0
  if shape == "square":
    return (au <= 0.8) & (av <= 0.8)
  if shape == "triangle":  # apex up
    return (v >= -0.9) & (v <= 0.8) & (au <= (v + 0.9) / 1.7)
  if shape == "diamond":
    return au + av <= 1.0
  if shape == "plus":
    return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
  if shape == "ring":
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.5 * 0.5)
  if shape == "bar":
    return (au <= 1.0) & (av <= 0.4)
  if shape == "cross":  # a diagonal cross (X)
    return (au <= 0.85) & (av <= 0.85) & ((np.abs(u - v) <= 0.42) | (np.abs(u + v) <= 0.42))
  raise ValueError(f"unknown shape {shape!r}")


def _object_layer(obj: PlacedObject, size: int) -> tuple[int, int, np.ndarray, np.ndarray]:
  """Coverage and colour of one object in its pixel window.

  Returns:
    (y0, x0, alpha [h, w] float in [0, 1], rgb [h, w, 3] float), the window's top-left corner first.
  """
  cls = CLASS_BY_NAME[obj.name]
  cell = size / GRID
  cx = (obj.col + 0.5 + obj.dx) * cell
  cy = (obj.row + 0.5 + obj.dy) * cell
  r = obj.scale * cell / 2
  x0, x1 = max(0, int(np.floor(cx - r))), min(size, int(np.ceil(cx + r)))
  y0, y1 = max(0, int(np.floor(cy - r))), min(size, int(np.ceil(cy + r)))
  h, w = y1 - y0, x1 - x0
  # Supersampled coverage: SUPERSAMPLE^2 points per pixel, averaged.
  sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
  ys = (y0 + np.arange(h)[:, None] + sub[None, :]).reshape(-1)
  xs = (x0 + np.arange(w)[:, None] + sub[None, :]).reshape(-1)
  inside = _shape_mask(cls.shape, (xs[None, :] - cx) / r, (ys[:, None] - cy) / r)
  alpha = inside.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))
  # Texture on whole pixels, anchored at the window corner so it looks the same wherever the object is.
  band = max(1, round(size / 32))
  ly, lx = np.mgrid[0:h, 0:w]
  if cls.texture == "solid":
    dark = np.zeros((h, w), bool)
  elif cls.texture == "striped":  # diagonal stripes
    dark = ((lx + ly) // band) % 2 == 1
  elif cls.texture == "dotted":
    dark = ((lx // band) % 2 == 1) & ((ly // band) % 2 == 1)
  else:
    raise ValueError(f"unknown texture {cls.texture!r}")
  base = np.asarray(COLOURS[cls.colour], np.float64)
  rgb = np.where(dark[..., None], base * 0.3, base)
  return y0, x0, alpha, rgb


def _background(scene: Scene, size: int) -> np.ndarray:
  """Background of a scene type: base colour, a faint pattern, brightness jitter and pixel noise."""
  st = SCENE_BY_NAME[scene.scene_type]
  rng = np.random.default_rng(scene.noise_seed)
  img = np.empty((size, size, 3), np.float64)
  img[:] = np.asarray(st.background, np.float64) + scene.brightness
  y, x = np.mgrid[0:size, 0:size]
  p = max(4, size // 8)
  if st.pattern == "tiles":
    delta = np.where((x % p == 0) | (y % p == 0), 14.0, 0.0)
  elif st.pattern == "speckle":
    delta = np.where(rng.random((size, size)) < 0.15, rng.uniform(-18, 18, (size, size)), 0.0)
  elif st.pattern == "road":
    delta = np.where((y % (2 * p) == p) & ((x // (p // 2)) % 2 == 0), 16.0, 0.0)
  elif st.pattern == "planks":
    delta = np.where(x % (p + p // 2) == 0, -12.0, 0.0)
  elif st.pattern == "sand":
    delta = rng.uniform(-10, 10, (size, size))
  elif st.pattern == "diagonal":
    delta = np.where(((x + y) // p) % 2 == 0, 8.0, 0.0)
  else:
    raise ValueError(f"unknown background pattern {st.pattern!r}")
  img += delta[..., None]
  img += rng.normal(0.0, 2.5, (size, size, 3))
  return img


def render(scene: Scene, size: int = 64) -> np.ndarray:
  """Renders a scene.

  Args:
    scene: the scene.
    size: image side in pixels (>= 24; 64 gives ~21 px cells and ~15 px objects).

  Returns:
    uint8 RGB array [size, size, 3].
  """
  if size < 24:
    raise ValueError(f"size must be >= 24 pixels, got {size}")
  img = _background(scene, size)
  for obj in scene.objects:
    y0, x0, alpha, rgb = _object_layer(obj, size)
    h, w = alpha.shape
    a = alpha[..., None]
    img[y0:y0 + h, x0:x0 + w] = img[y0:y0 + h, x0:x0 + w] * (1 - a) + rgb * a
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def object_boxes(scene: Scene, size: int = 64) -> list[tuple[str, list[int], int]]:
  """Tight pixel boxes of the objects (pixels at least half covered).

  Returns:
    One (class name, [x, y, w, h], area in pixels) per object, in the scene's object order.
  """
  out = []
  for obj in scene.objects:
    y0, x0, alpha, _ = _object_layer(obj, size)
    on = alpha >= 0.5
    rows, cols = np.nonzero(on.any(axis=1))[0], np.nonzero(on.any(axis=0))[0]
    box = [x0 + int(cols[0]), y0 + int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    out.append((obj.name, box, int(on.sum())))
  return out


# ---------------------------------------------------------------------------------------------------------------
# Captions


def _article(word: str) -> str:
  return ("an " if word[0] in "aeiou" else "a ") + word


def _join(items: Sequence[str]) -> str:
  if len(items) == 1:
    return items[0]
  return ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene, rng: np.random.Generator, template: int | None = None,
            synonym_p: float = 0.0) -> str:
  """A caption that names every object of the scene exactly once, in canonical (class id) order.

  Args:
    scene: the scene.
    rng: random generator (consumed: template choice and synonym choice).
    template: index into TEMPLATES; None draws one with TEMPLATE_WEIGHTS.
    synonym_p: probability of naming an object by one of its synonyms (when it has any).

  Returns:
    The caption, e.g. "A kitchen with a fork, a spoon and a plate."
  """
  if template is None:
    template = int(rng.choice(len(TEMPLATES), p=TEMPLATE_WEIGHTS))
  if not 0 <= template < len(TEMPLATES):
    raise ValueError(f"template must be in [0, {len(TEMPLATES)}), got {template}")
  words = []
  for name in scene.names:
    syn = CLASS_BY_NAME[name].synonyms
    if syn and synonym_p > 0 and rng.random() < synonym_p:
      name = syn[int(rng.integers(len(syn)))]
    words.append(_article(name))
  text = TEMPLATES[template].format(scene=SCENE_BY_NAME[scene.scene_type].phrase, objs=_join(words))
  return text[0].upper() + text[1:]


def reference_captions(scene: Scene, rng: np.random.Generator, first: str, k: int) -> list[str]:
  """`first` plus k - 1 captions with other templates (synonyms allowed), all naming exactly the scene's objects.

  Args:
    scene: the scene.
    rng: random generator (consumed).
    first: the primary caption (kept as the first reference).
    k: number of references, 1 to len(TEMPLATES).
  """
  if not 1 <= k <= len(TEMPLATES):
    raise ValueError(f"k must be in [1, {len(TEMPLATES)}], got {k}")
  out = [first]
  for t in rng.permutation(len(TEMPLATES)):
    if len(out) == k:
      break
    c = caption(scene, rng, template=int(t), synonym_p=0.3)
    if c not in out:
      out.append(c)
  return out


def caption_vocabulary() -> list[str]:
  """Every word (lowercase, punctuation stripped) that a caption can contain, sorted."""
  words = {"a", "an"}
  for t in TEMPLATES:
    words.update(t.replace("{scene}", "").replace("{objs}", "").replace(".", " ").lower().split())
  for st in SCENE_TYPES:
    words.update(st.phrase.split())
  for name in CLASS_NAMES:
    words.add(name)
    words.update(CLASS_BY_NAME[name].synonyms)
  words.add("and")
  return sorted(words)


def caption_corpus_chars() -> str:
  """Every character that can appear in a caption, sorted (for training a tokenizer)."""
  chars = set(" ,.")
  for w in caption_vocabulary():
    chars.update(w)
    chars.add(w[0].upper())  # any caption-initial word is capitalised
  return "".join(sorted(chars))
