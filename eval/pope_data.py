"""POPE data: question files, the POPE builder (three negative-sampling rules), answer parsers and scoring.

Reference: POPE (Li et al., EMNLP 2023), the authors' ``main.py``/``utils.py`` (builder) and ``evaluate.py``
(scoring). Facts reproduced here:

Builder. Images with at least ``sample_num`` (3) ground-truth objects are kept and ``img_num`` (500) of them are
drawn with ``random.sample``; object frequencies and co-occurrence counts are computed over the *drawn* images
only. Per image, positive i is the image's i-th object (file order), and after each positive one negative is
drawn (so questions alternate yes, no, yes, no, ...):
  * random: ``random.choice`` over the objects seen in the drawn images (first-seen order), redrawn while it is
    present in the image or already asked;
  * popular: the most frequent object not present and not yet asked (ties: first seen first);
  * adversarial: the object that co-occurs most often with the current positive, not present and not yet asked
    (ties: first seen first); when none is left, a random one as above.
The question is "Is there a {object} in the image?" with "an" before a vowel. The authors' code never seeds
``random``; here one ``random.Random(seed)`` draws the images and then the random, popular and adversarial
splits in that order (one stream, as the authors' single process does). The released question files were built
by a version whose template is exact ("an" replaces only the article), which is what ``question_text`` does.

Scoring (reference parser). Keep the first sentence (text before the first "."), drop commas, split on single
spaces; the answer is "no" when one of the words is "No", "no" or "not", else "yes" (so an empty or off-topic
answer counts as yes). Accuracy, precision, recall and F1 of "yes" as the positive class, and the yes-ratio.
The stricter parser (``parse_strict``) reads the first word (yes/no), then negations anywhere in the first
sentence, then an affirmative "there is/are ..." form; anything else is *unparsed*: it counts as wrong for
accuracy, as a missed positive for recall, and never as a "yes".
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

SPLITS = ("random", "popular", "adversarial")
TEMPLATE = "Is there a {} in the image?"
LABELS = ("yes", "no")


class PopeDataError(ValueError):
  """A malformed POPE question file or annotation (the message names the file, line and field)."""


# ---------------------------------------------------------------------------------------------------------
# Question files


def read_questions(path: str | Path) -> list[dict[str, Any]]:
  """A POPE question file (JSONL: ``question_id``, ``image``, ``text``, ``label`` yes/no), in file order.

  Raises:
    FileNotFoundError: No such file.
    PopeDataError: A line is not a JSON object, lacks a field, has a bad label or repeats a question id.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"POPE question file not found: {path}")
  out, seen = [], set()
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise PopeDataError(f"{path}:{n}: not a JSON object ({e})") from e
    if not isinstance(obj, dict):
      raise PopeDataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
    for field in ("question_id", "image", "text", "label"):
      if field not in obj:
        raise PopeDataError(f"{path}:{n}: missing field {field!r} (keys: {sorted(obj)})")
    if obj["label"] not in LABELS:
      raise PopeDataError(f"{path}:{n}: label must be 'yes' or 'no', got {obj['label']!r}")
    if not isinstance(obj["text"], str) or not isinstance(obj["image"], str):
      raise PopeDataError(f"{path}:{n}: 'text' and 'image' must be strings")
    if obj["question_id"] in seen:
      raise PopeDataError(f"{path}:{n}: question_id {obj['question_id']!r} appears twice")
    seen.add(obj["question_id"])
    out.append({k: obj[k] for k in ("question_id", "image", "text", "label")})
  if not out:
    raise PopeDataError(f"{path}: no questions")
  return out


def split_files(directory: str | Path, dataset: str = "coco") -> dict[str, Path]:
  """``<dir>/<dataset>_pope_<split>.json`` for the three splits (an error names the missing ones)."""
  files = {s: Path(directory) / f"{dataset}_pope_{s}.json" for s in SPLITS}
  missing = [str(f) for f in files.values() if not f.is_file()]
  if missing:
    raise FileNotFoundError(f"POPE question file(s) not found: {', '.join(missing)}")
  return files


# ---------------------------------------------------------------------------------------------------------
# Builder


def question_text(obj: str, template: str = TEMPLATE) -> str:
  """The question about ``obj``: the template's article "a" becomes "an" before a vowel."""
  if obj[:1].lower() in "aeiou" and "a {}" in template:
    template = template.replace("a {}", "an {}", 1)
  return template.format(obj)


def objects_from_instances(path: str | Path) -> list[dict[str, Any]]:
  """Per-image object lists from COCO-format instance annotations, in the file's ``images`` order.

  Each image's objects are its annotations' category names, first occurrence first (POPE's
  ``{"image", "objects"}`` records; ``image_id`` is kept too). Images without annotations get no objects.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"instances file not found: {path}")
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise PopeDataError(f"{path}: not valid JSON ({e})") from e
  for key in ("images", "annotations", "categories"):
    if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
      raise PopeDataError(f"{path}: missing list {key!r} (expected COCO instances format)")
  names = {}
  for c in data["categories"]:
    if "id" not in c or "name" not in c:
      raise PopeDataError(f"{path}: a category lacks 'id' or 'name': {c}")
    names[c["id"]] = c["name"]
  objects: dict[Any, list[str]] = {}
  files: dict[Any, str] = {}
  for n, im in enumerate(data["images"]):
    if "id" not in im or "file_name" not in im:
      raise PopeDataError(f"{path}: images[{n}] lacks 'id' or 'file_name'")
    files.setdefault(im["id"], im["file_name"])
    objects.setdefault(im["id"], [])
  for n, ann in enumerate(data["annotations"]):
    if ann.get("image_id") not in objects:
      raise PopeDataError(f"{path}: annotations[{n}] has image_id {ann.get('image_id')!r} not among the images")
    if ann.get("category_id") not in names:
      raise PopeDataError(f"{path}: annotations[{n}] has unknown category_id {ann.get('category_id')!r}")
    name = names[ann["category_id"]]
    if name not in objects[ann["image_id"]]:
      objects[ann["image_id"]].append(name)
  return [{"image": files[i], "image_id": i, "objects": objects[i]} for i in files]


def frequencies(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
  """Object -> number of images holding it, in first-seen order."""
  freq: dict[str, int] = {}
  for r in records:
    for o in r["objects"]:
      freq[o] = freq.get(o, 0) + 1
  return freq


def popular_order(freq: Mapping[str, int]) -> list[str]:
  """Objects by decreasing frequency; ties keep the table's (first-seen) order (a stable sort, as the reference)."""
  return [o for o, _ in sorted(freq.items(), key=lambda kv: kv[1], reverse=True)]


def co_occurrence(records: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
  """Object -> the other objects, most often in the same image first (ties: first seen first)."""
  counts: dict[str, dict[str, int]] = {}
  for r in records:
    for o in r["objects"]:
      row = counts.setdefault(o, {})
      for other in r["objects"]:
        if other != o:
          row[other] = row.get(other, 0) + 1
  return {o: [k for k, _ in sorted(row.items(), key=lambda kv: kv[1], reverse=True)] for o, row in counts.items()}


def _random_negative(rng: random.Random, pool: Sequence[str], taken: set[str], image: str) -> str:
  if all(o in taken for o in pool):
    raise PopeDataError(f"image {image}: every object of the vocabulary ({len(pool)}) is present or already asked; "
                        "no negative can be drawn")
  choice = rng.choice(pool)
  while choice in taken:
    choice = rng.choice(pool)
  return choice


def build_split(records: Sequence[Mapping[str, Any]], strategy: str, rng: random.Random, *, sample_num: int = 3,
                template: str = TEMPLATE, pool: Sequence[str] | None = None,
                popular: Sequence[str] | None = None, co_occur: Mapping[str, Sequence[str]] | None = None,
                positives: Callable[[Mapping[str, Any]], Sequence[str]] | None = None) -> list[dict[str, Any]]:
  """One POPE split over already drawn images (see the module docstring for the rules).

  Args:
    records: ``{"image", "objects", ...}`` per image, each with at least ``sample_num`` objects.
    strategy: "random", "popular" or "adversarial".
    rng: The random stream (consumed by random draws only).
    sample_num: Positives (and negatives) per image.
    template: Question template with one ``{}``.
    pool: Objects random negatives are drawn from (default: those seen in ``records``, first-seen order).
    popular: Objects by decreasing frequency (default: computed over ``records``).
    co_occur: Object -> co-occurring objects, most frequent first (default: computed over ``records``).
    positives: Picks an image's positives (default: its first ``sample_num`` objects, as the reference).

  Returns:
    Questions ``{"question_id", "image", "text", "label", "object"}`` numbered from 1.
  """
  if strategy not in SPLITS:
    raise ValueError(f"unknown POPE strategy {strategy!r}; expected one of {SPLITS}")
  freq = frequencies(records)
  pool = list(freq) if pool is None else list(pool)
  popular = popular_order(freq) if popular is None else popular
  co_occur = co_occurrence(records) if co_occur is None else co_occur
  questions: list[dict[str, Any]] = []

  def add(record, obj, label):
    questions.append({"question_id": len(questions) + 1, "image": record["image"],
                      "text": question_text(obj, template), "label": label, "object": obj})

  for record in records:
    objects = list(record["objects"])
    if len(objects) < sample_num:
      raise PopeDataError(f"image {record['image']} has {len(objects)} objects, fewer than sample_num={sample_num}")
    chosen = list(positives(record)) if positives is not None else objects[:sample_num]
    taken = set(objects)
    for pos in chosen:
      taken.add(pos)
      add(record, pos, "yes")
      neg = None
      if strategy == "popular":
        neg = next((o for o in popular if o not in taken), None)
      elif strategy == "adversarial":
        neg = next((o for o in co_occur.get(pos, ()) if o not in taken), None)
      if neg is None:
        neg = _random_negative(rng, pool, taken, record["image"])
      taken.add(neg)
      add(record, neg, "no")
  return questions


def build_splits(records: Sequence[Mapping[str, Any]], *, num_images: int = 500, seed: int = 0, sample_num: int = 3,
                 template: str = TEMPLATE, **kwargs) -> dict[str, list[dict[str, Any]]]:
  """The three POPE splits from per-image object lists (``objects_from_instances``), seeded.

  Images with fewer than ``sample_num`` objects are dropped, ``num_images`` are drawn with
  ``random.Random(seed).sample`` and the same stream then builds random, popular and adversarial. Extra keyword
  arguments go to ``build_split``.
  """
  eligible = [r for r in records if len(r["objects"]) >= sample_num]
  if len(eligible) < num_images:
    raise PopeDataError(f"only {len(eligible)} images have at least {sample_num} objects; asked for "
                        f"{num_images} (lower --num-images)")
  rng = random.Random(seed)
  drawn = rng.sample(eligible, num_images)
  return {s: build_split(drawn, s, rng, sample_num=sample_num, template=template, **kwargs) for s in SPLITS}


def write_questions(path: str | Path, questions: Iterable[Mapping[str, Any]]) -> None:
  """A question file in the reference format (one JSON object per line; extra fields dropped)."""
  from air_jax.atomic import atomic_write_text

  lines = [json.dumps({k: q[k] for k in ("question_id", "image", "text", "label")}) for q in questions]
  atomic_write_text(path, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Parsers and scoring

_NEGATIONS = {"no", "not", "none", "nothing", "nobody", "nowhere", "neither", "nor", "never", "cannot"}
_YES_FIRST = {"yes", "yeah", "yep", "yup", "correct", "true"}
_NO_FIRST = {"no", "nope", "incorrect", "false"}
_HEDGE = re.compile(r"\b(not sure|unsure|don't know|do not know|can't tell|cannot tell|can't determine|cannot "
                    r"determine|cannot be determined|unclear|not clear|uncertain|impossible to (tell|say|determine))\b")
_AFFIRM = re.compile(r"^(there\s+(is|are)|i\s+(can\s+)?see|the\s+image\s+(shows|contains|has|features))\b")


def parse_reference(text: str) -> str:
  """The reference parser (``evaluate.py``): "no" if the first sentence has the word No/no/not, else "yes"."""
  if text.find(".") != -1:
    text = text.split(".")[0]
  words = text.replace(",", "").split(" ")
  return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_strict(text: str) -> str | None:
  """A stricter parser: "yes", "no", or None when the answer does not say.

  Order: the first word (yes/yeah/... or no/nope/...); a hedge in the first sentence ("not sure", "cannot
  tell", ...) -> None; a negation in the first sentence (no, not, none, n't,
  ...) -> "no"; an affirmative existence form ("there is", "I see", "the image shows") -> "yes"; else None.
  """
  lowered = text.strip().lower()
  words = re.findall(r"[a-z]+(?:'[a-z]+)?", lowered)
  if not words:
    return None
  if words[0] in _YES_FIRST:
    return "yes"
  if words[0] in _NO_FIRST:
    return "no"
  first = re.split(r"[.!?\n]", lowered, maxsplit=1)[0].strip()
  if _HEDGE.search(first):
    return None
  first_words = re.findall(r"[a-z]+(?:'[a-z]+)?", first)
  if any(w in _NEGATIONS or w.endswith("n't") for w in first_words):
    return "no"
  if "yes" in first_words:
    return "yes"
  if _AFFIRM.match(first):
    return "yes"
  return None


PARSERS: dict[str, Callable[[str], str | None]] = {"reference": parse_reference, "strict": parse_strict}


def _ratio(num: float, den: float) -> float | None:
  return num / den if den else None


def score(labels: Sequence[str], predictions: Sequence[str | None]) -> dict[str, Any]:
  """POPE metrics of predictions ("yes"/"no"/None = unparsed) against labels, "yes" the positive class.

  accuracy = (TP + TN) / n, precision = TP / (TP + FP), recall = TP / (TP + FN), F1, yes_ratio = yes / n; an
  unparsed answer is neither a yes nor a no: it lowers accuracy and recall (its positive counts in FN) but not
  precision. Undefined ratios (a zero denominator) are None.
  """
  if len(labels) != len(predictions):
    raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
  tp = fp = tn = fn = unparsed = 0
  for label, pred in zip(labels, predictions):
    if pred is None:
      unparsed += 1
      fn += label == "yes"
    elif pred == "yes":
      tp += label == "yes"
      fp += label == "no"
    else:
      tn += label == "no"
      fn += label == "yes"
  n = len(labels)
  precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
  f1 = (2 * precision * recall / (precision + recall)
        if precision is not None and recall is not None and precision + recall > 0 else None)
  yes = sum(p == "yes" for p in predictions)
  return {"n": n, "TP": tp, "FP": fp, "TN": tn, "FN": fn, "unparsed": unparsed, "accuracy": _ratio(tp + tn, n),
          "precision": precision, "recall": recall, "f1": f1, "yes_ratio": _ratio(yes, n)}


METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def average(per_split: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
  """Mean of each metric over the splits (None if any split leaves it undefined)."""
  out = {}
  for m in METRICS:
    vals = [r[m] for r in per_split.values()]
    out[m] = None if not vals or any(v is None for v in vals) else sum(vals) / len(vals)
  return out
