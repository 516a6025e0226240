"""Organism v2 data: scene priors per split, long captions, the text-only corpus and POPE object lists.

Same world as v1 (organism.vocab: 24 classes, 6 scene types, one 3-member co-occurrence group and one single
object per scene; organism.scenes renders), different data design (issue 18):

- split "text" (the language model's corpus, no image): groups are complete with p = 1 - TEXT_BREAK (~3 %);
- split "train" (image-caption pairs for projector alignment and the fine-tune): break rate TRAIN_BREAK (~12 %),
  so the model can learn from pixels that a member may be missing;
- split "test" (held-out, any seed): half of the scenes with a group are traps (one member missing).
- Out-of-context objects are handled the same way in every split: a scene may hold the *single* object of
  another scene type (never another scene's group member), with the same probability everywhere, so there is no
  train/test recognition shift (v1's test split had foreign group members never seen out of context).

Captions are long (26-78 tokens measured): an opening sentence naming the scene and its floor, then one sentence per
object in canonical (class id) order with its grid position, colour and texture:

  "A photo of a kitchen with a tiled floor, seen from above. There is a fork at the top left, red and solid.
   There is a spoon at the centre, green and solid. There is a plate at the bottom, blue and solid."

The third member of a complete group is named after >= 41 text tokens (>= 29 when a member is missing), so
attention to the earlier text (TAI) has distance.
Words are single tokens of the v2 tokenizer; no filler word is an object name.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from organism.scenes import GRID, PlacedObject, Scene, _order, place_scene
from organism.vocab import CLASS_BY_NAME, CLASS_NAMES, SCENE_BY_NAME, SCENE_TYPES

SPLITS2: tuple[str, ...] = ("text", "train", "test")
GROUP_P = 0.8  # the scene's own group appears (text, train); test: trap or complete
TEXT_BREAK = 0.03
TRAIN_BREAK = 0.12
TEST_TRAP_P = 0.5  # of the test scenes with a group, the fraction with one member missing
SINGLE_P = 0.5
FOREIGN_P = 0.1  # the single object of another scene type appears (every split alike)

FLOOR: dict[str, str] = {"kitchen": "tiled", "park": "grassy", "street": "paved", "office": "wooden",
                         "beach": "sandy", "bedroom": "checkered"}
POSITION: tuple[tuple[str, ...], ...] = (("top", "left"), ("top",), ("top", "right"), ("left",), ("centre",),
                                         ("right",), ("bottom", "left"), ("bottom",), ("bottom", "right"))


def sample_scene2(rng: np.random.Generator, split: str) -> Scene:
  """Samples one v2 scene of a split ("text", "train" or "test"); `Scene.split` is the split name."""
  if split not in SPLITS2:
    raise ValueError(f"split must be one of {SPLITS2}, got {split!r}")
  st = SCENE_TYPES[int(rng.integers(len(SCENE_TYPES)))]
  others = [s for s in SCENE_TYPES if s.name != st.name]
  names: list[str] = []
  trap = False
  if rng.random() < GROUP_P:
    group = list(st.group)
    if split == "test":
      trap = bool(rng.random() < TEST_TRAP_P)
      broken = trap
    else:
      broken = bool(rng.random() < (TEXT_BREAK if split == "text" else TRAIN_BREAK))
    if broken:
      group.pop(int(rng.integers(len(group))))
    names += group
  if rng.random() < SINGLE_P:
    names.append(st.single)
  if rng.random() < FOREIGN_P:
    names.append(others[int(rng.integers(len(others)))].single)
  if not names:
    names.append(st.single)
  return place_scene(rng, st, _order(names), split, trap)


def article(word: str) -> str:
  """The indefinite article captions use before `word`."""
  return "an" if word[0] in "aeiou" else "a"


def _article(word: str) -> str:
  return f"{article(word)} {word}"


def opening(scene: Scene) -> str:
  """The scene sentence: "A photo of a kitchen with a tiled floor, seen from above." """
  st = SCENE_BY_NAME[scene.scene_type]
  return f"A photo of {st.phrase} with {_article(FLOOR[st.name])} floor, seen from above."


def object_sentence(obj: PlacedObject) -> str:
  """ "There is a fork at the top left, red and solid." """
  cls = CLASS_BY_NAME[obj.name]
  pos = " ".join(POSITION[obj.row * GRID + obj.col])
  return f"There is {_article(obj.name)} at the {pos}, {cls.colour} and {cls.texture}."


def caption2(scene: Scene) -> str:
  """The v2 caption of a scene (deterministic: canonical object order, one sentence per object)."""
  return " ".join([opening(scene)] + [object_sentence(o) for o in scene.objects])


def caption2_vocabulary() -> list[str]:
  """Every word (lowercase, punctuation stripped) a v2 caption can contain, sorted."""
  from organism.vocab import COLOUR_NAMES, TEXTURES

  words = set("a an photo of with floor seen from above there is at the and".split())
  words.update(FLOOR.values())
  words.update(w for p in POSITION for w in p)
  words.update(COLOUR_NAMES)
  words.update(TEXTURES)
  for st in SCENE_TYPES:
    words.update(st.phrase.split())
  words.update(CLASS_NAMES)
  return sorted(words)


def name_positions(scene: Scene, tokenizer) -> dict[str, int]:
  """Index (in caption tokens, no BOS) of each object's name in `caption2(scene)` tokenised by `tokenizer`."""
  ids = tokenizer.encode(caption2(scene), add_special_tokens=False)
  toks = [tokenizer.convert_ids_to_tokens(i).lstrip("\u2581") for i in ids]
  out = {}
  for n in scene.names:
    out[n] = toks.index(n)
  return out


def pope_objects(scene: Scene) -> dict[str, list[str]]:
  """Object lists for POPE-style questions: present objects, and absent ones by sampling pool.

  Returns {"present": [...], "absent_random": every absent class, "absent_popular": absent classes ordered by
  train frequency rank (group members first), "absent_adversarial": the scene's expected-absent group partners
  first, then the other absent members of its own scene type, then the rest}.
  """
  present = list(scene.names)
  absent = [n for n in CLASS_NAMES if n not in present]
  group_members = {m for st in SCENE_TYPES for m in st.group}
  popular = sorted(absent, key=lambda n: (n not in group_members, CLASS_NAMES.index(n)))
  own = SCENE_BY_NAME[scene.scene_type]
  adv_first = list(scene.expected_absent)
  adv_next = [n for n in (*own.group, own.single) if n in absent and n not in adv_first]
  adversarial = adv_first + adv_next + [n for n in absent if n not in adv_first and n not in adv_next]
  return {"present": present, "absent_random": absent, "absent_popular": popular,
          "absent_adversarial": adversarial}


def scenes2(n: int, seed: int, split: str, start: int = 0) -> list[Scene]:
  """Scenes start..start+n-1 of a split; scene i is drawn from `default_rng([seed, 100 + split id, i])`."""
  if split not in SPLITS2:
    raise ValueError(f"split must be one of {SPLITS2}, got {split!r}")
  sid = 100 + SPLITS2.index(split)
  return [sample_scene2(np.random.default_rng([seed, sid, i]), split) for i in range(start, start + n)]


def tag_context(scene: Scene, rng: np.random.Generator, keep: float = 0.7) -> str:
  """A noisy, shuffled word list of a scene (the text stage's stand-in for an image): scene word and objects,
  each kept with probability `keep`; an empty string when nothing is kept."""
  words = [scene.scene_type] + list(scene.names)
  kept = [w for w in words if rng.random() < keep]
  kept = [kept[i] for i in rng.permutation(len(kept))] if kept else []
  return " ".join(kept)


def corpus_texts(names: Sequence[Scene]) -> list[str]:
  """Captions of scenes (helper for tokenizer training)."""
  return [caption2(s) for s in names]
