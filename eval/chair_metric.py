"""The CHAIR object-hallucination metric (Rohrbach et al., EMNLP 2018), as AIR evaluates it.

Reference behaviour. AIR's ``decoding.sh`` scores captions with ``eval_scripts/eval_utils/eval_chair.py`` of
the AD-HH code (TianyunYoung/Hallucination-Attribution), whose ``chair.py`` is Rohrbach's ``utils/chair.py``
with two changes: ``pattern.en.singularize`` is replaced by a pure-Python singulariser adapted from Bermi
Ferrer's Inflector (the same rule tables pattern.en uses, plus a few custom words), and the singulariser is
applied at lookup time instead of to every token first. Style ``"adhh"`` (the default) reproduces that code;
style ``"rohrbach"`` reproduces the original order (singularise every token, then match) with the same
singulariser standing in for pattern.en (not installable here). OPERA's variant lemmatises with an NLTK POS
tagger and WordNet, which need NLTK data downloads; it is not offered.

What the metric does with one caption (both styles):
  1. lower-case, ``nltk.word_tokenize`` (``eval.word_tokenize``, no NLTK data needed);
  2. merge "double words" left to right: a pair of adjacent tokens found in ``double_word_dict`` becomes
     one word (e.g. "teddy bear"; "baby bird" -> "bird"; "passenger jet" -> "jet"; "toilet seat" ->
     "toilet"; "train track"/"home plate" merge so that they do not fire "train"/nothing);
  3. if "toilet" and "seat" are both among the merged words, drop every "seat" (else "seat" fires "chair");
  4. keep the words that are in the synonym list; each maps to its category (the first entry of its line).
C_S = captions with at least one hallucinated mention / captions; C_I = hallucinated mentions / all
mentions (a category named three times counts three times). A mention is hallucinated when its category is
not among the image's ground-truth objects (instance categories plus categories named in the human captions,
see ``eval.coco``).

Known quirks of the reference that are reproduced on purpose (they move published numbers):
  * the singulariser turns "bus" into "bu" (so a singular "bus" never counts, "buses" does), "our" into "my"
    ("hour" -> "hmy"), and leaves any word that is a suffix of an uninflected word ("ice", "a") alone;
  * "iPhone" is never matched (captions are lower-cased, the entry is not); "stove top oven" has three words
    and can never be merged.
Deviations, documented:
  * synonym entries are stripped (the shared data contract): the reference's ``split(", ")`` keeps the
    leading space of " motor bike" and " cheesecake" so those two never match; ``strip_entries=False``
    restores that;
  * ``idxs`` are the true token positions: the reference computes them after dropping "seat", which shifts
    every later index by one in captions that mention a toilet seat (its C_S/C_I do not use indices);
  * output lists of sets are sorted (the reference prints Python set order);
  * (``eval.chair``) a second caption for an image already scored, or a caption whose image is not in the
    split, is skipped and listed (the reference scores duplicates twice and gives an unknown id no ground
    truth). Empty captions are scored, as in the reference (they name no object).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from eval.word_tokenize import word_tokenize

# ---------------------------------------------------------------------------------------------------------
# Singulariser of the AD-HH ``chair.py`` (pattern.en's rule tables, adapted from Bermi Ferrer's Inflector).
# The tables are reproduced literally, including their accidents, because they decide what is an object.

# (pattern, replacement) tried in order; the first pattern that matches decides.
_SINGULAR_RULES = [(re.compile(p), r) for p, r in (
  (r"(?i)(.)ae$", "\\1a"),
  (r"(?i)(.)itis$", "\\1itis"),
  (r"(?i)(.)eaux$", "\\1eau"),
  (r"(?i)(quiz)zes$", "\\1"),
  (r"(?i)(matr)ices$", "\\1ix"),
  (r"(?i)(ap|vert|ind)ices$", "\\1ex"),
  (r"(?i)^(ox)en", "\\1"),
  (r"(?i)(alias|status)es$", "\\1"),
  (r"(?i)([octop|vir])i$", "\\1us"),  # a character class in the reference, not an alternation
  (r"(?i)(cris|ax|test)es$", "\\1is"),
  (r"(?i)(shoe)s$", "\\1"),
  (r"(?i)(o)es$", "\\1"),
  (r"(?i)(bus)es$", "\\1"),
  (r"(?i)([m|l])ice$", "\\1ouse"),
  (r"(?i)(x|ch|ss|sh)es$", "\\1"),
  (r"(?i)(m)ovies$", "\\1ovie"),
  (r"(?i)(.)ombies$", "\\1ombie"),
  (r"(?i)(s)eries$", "\\1eries"),
  (r"(?i)([^aeiouy]|qu)ies$", "\\1y"),
  (r"([aeo]l)ves$", "\\1f"),
  (r"([^d]ea)ves$", "\\1f"),
  (r"arves$", "arf"),
  (r"erves$", "erve"),
  (r"([nlw]i)ves$", "\\1fe"),
  (r"(?i)([lr])ves$", "\\1f"),
  (r"([aeo])ves$", "\\1ve"),
  (r"(?i)(sive)s$", "\\1"),
  (r"(?i)(tive)s$", "\\1"),
  (r"(?i)(hive)s$", "\\1"),
  (r"(?i)([^f])ves$", "\\1fe"),
  (r"(?i)(^analy)ses$", "\\1sis"),
  (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", "\\1\\2sis"),
  (r"(?i)(.)opses$", "\\1opsis"),
  (r"(?i)(.)yses$", "\\1ysis"),
  (r"(?i)(h|d|r|o|n|b|cl|p)oses$", "\\1ose"),
  (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", "\\1ose"),
  (r"(?i)(.)oses$", "\\1osis"),
  (r"(?i)([ti])a$", "\\1um"),
  (r"(?i)(n)ews$", "\\1ews"),
  (r"(?i)([^s])s$", "\\1"),
)]

# Words returned unchanged when the (lower-cased) word is a *suffix* of one of them (the reference's test).
# "wildebeestcarp" and "watercheese" are two entries each in the reference lost to a missing comma.
_SINGULAR_UNINFLECTED = frozenset((
  "bison", "debris", "headquarters", "pincers", "trout", "bream", "diabetes", "herpes", "pliers", "tuna",
  "breeches", "djinn", "high-jinks", "proceedings", "whiting", "britches", "eland", "homework", "rabies",
  "wildebeestcarp", "elk", "innings", "salmon", "chassis", "flounder", "jackanapes", "scissors",
  "christmas", "gallows", "mackerel", "series", "clippers", "georgia", "measles", "shears", "cod",
  "graffiti", "mews", "species", "contretemps", "mumps", "swine", "corps", "news", "swiss",
  "api", "mae", "sae", "basis", "india", "media",
))
_SINGULAR_UNCOUNTABLE = frozenset((
  "advice", "equipment", "happiness", "luggage", "news", "software", "bread", "fruit", "information",
  "mathematics", "progress", "understanding", "butter", "furniture", "ketchup", "mayonnaise", "research",
  "watercheese", "garbage", "knowledge", "meat", "rice", "electricity", "gravel", "love", "mustard", "sand",
))
# "-ie" nouns: a word ending in one of these plus "s" loses the "s" (and is lower-cased). "^pie"/"^tie" are
# literal strings in the reference and never match; "zombiebogie" is another lost comma.
_SINGULAR_IE = frozenset((
  "alergie", "cutie", "hoagie", "newbie", "softie", "veggie", "auntie", "doggie", "hottie", "nightie",
  "sortie", "weenie", "beanie", "eyrie", "indie", "oldie", "stoolie", "yuppie", "birdie", "freebie",
  "junkie", "^pie", "sweetie", "zombiebogie", "goonie", "laddie", "pixie", "techie", "bombie", "groupie",
  "laramie", "quickie", "^tie", "collie", "hankie", "lingerie", "reverie", "toughie", "cookie", "hippie",
  "meanie", "rookie", "valkyrie",
))
# Irregular plurals, matched as word *endings* in this order ("women" -> "woman", "hour" -> "hmy").
_SINGULAR_IRREGULAR = {
  "abuses": "abuse", "ads": "ad", "atlantes": "atlas", "atlases": "atlas", "analysis": "analysis",
  "axes": "axe", "beeves": "beef", "brethren": "brother", "children": "child", "corpora": "corpus",
  "corpuses": "corpus", "ephemerides": "ephemeris", "feet": "foot", "ganglia": "ganglion", "geese": "goose",
  "genera": "genus", "genii": "genie", "graffiti": "graffito", "helves": "helve", "kine": "cow",
  "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose", "monies": "money",
  "moves": "move", "mythoi": "mythos", "numena": "numen", "occipita": "occiput", "octopodes": "octopus",
  "opera": "opus", "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis", "penises": "penis",
  "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth", "testes": "testis",
  "trilbys": "trilby", "turves": "turf", "zoa": "zoon",
}
_PLURAL_PREPOSITIONS = frozenset((
  "about", "before", "during", "of", "till", "above", "behind", "except", "off", "to", "across", "below",
  "for", "on", "under", "after", "beneath", "from", "onto", "until", "among", "beside", "in", "out",
  "unto", "around", "besides", "into", "over", "upon", "at", "between", "near", "since", "with",
  "athwart", "betwixt", "beyond", "but", "by",
))
_GROUP_REF = re.compile(r"\\(\d)")


def singularize(word: str) -> str:
  """The singular of ``word`` by the reference CHAIR code's rules (see the module docstring for quirks)."""
  if "-" in word:  # compounds like "mothers-in-law": singularise the head only
    parts = word.split("-")
    if len(parts) > 1 and parts[1] in _PLURAL_PREPOSITIONS:
      return singularize(parts[0]) + "-" + "-".join(parts[1:])
  if word.endswith("'"):  # "dogs'" -> "dog's"
    return singularize(word[:-1]) + "'s"
  lower = word.lower()
  if any(entry.endswith(lower) for entry in _SINGULAR_UNINFLECTED | _SINGULAR_UNCOUNTABLE):
    return word
  if any(lower.endswith(entry + "s") for entry in _SINGULAR_IE):
    return lower
  for plural, singular in _SINGULAR_IRREGULAR.items():
    if lower.endswith(plural):
      return re.sub("(?i)" + plural + "$", singular, word)
  for pattern, replacement in _SINGULAR_RULES:
    match = pattern.search(word)
    if match:
      # A group that did not take part in the match is dropped from the replacement (as the reference does).
      unmatched = {str(k + 1) for k, g in enumerate(match.groups()) if g is None}
      replacement = _GROUP_REF.sub(lambda m: "" if m.group(1) in unmatched else m.group(0), replacement)
      return pattern.sub(replacement, word)
  return word


# ---------------------------------------------------------------------------------------------------------
# Vocabulary

# The reference's hard-coded MS-COCO rules ("hot dog" and "teddy bear" are listed twice there).
COCO_DOUBLE_WORDS = (
  "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
  "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
  "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
  "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)
# "baby X"/"adult X" would otherwise fire "person" (baby, adult are person synonyms).
COCO_ANIMAL_WORDS = (
  "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
# "passenger X" would otherwise fire "person".
COCO_VEHICLE_WORDS = ("jet", "train")
COCO_SPECIAL_DOUBLE_WORDS = {"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"}
# (trigger, dropped): when both words are among a caption's merged words, every `dropped` is removed.
COCO_EXCLUSIONS = (("toilet", "seat"),)

STYLES = ("adhh", "rohrbach")
DEFAULT_SYNONYMS = Path(__file__).parent / "data" / "coco_chair_synonyms.txt"


def coco_double_word_dict() -> dict[str, str]:
  """The reference's ``double_word_dict``, built in the reference's order (later entries win)."""
  table = {w: w for w in COCO_DOUBLE_WORDS}
  for animal in COCO_ANIMAL_WORDS:
    table[f"baby {animal}"] = animal
    table[f"adult {animal}"] = animal
  for vehicle in COCO_VEHICLE_WORDS:
    table[f"passenger {vehicle}"] = vehicle
  table.update(COCO_SPECIAL_DOUBLE_WORDS)
  return table


def parse_synonyms(text: str, *, strip_entries: bool = True, source: str = "<synonyms>") -> list[list[str]]:
  """Parse a synonyms file: one category per line, canonical name first, entries separated by ", ".

  Args:
    text: File content.
    strip_entries: Strip every entry (the data contract). False keeps the reference's ``split(", ")``
      result, where an entry after a double space keeps a leading space and can never match.
    source: Name used in error messages.

  Returns:
    One list of entries per non-blank line; duplicates are kept (they are harmless).
  """
  lines = []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    entries = line.strip().split(", ")
    if strip_entries:
      entries = [e.strip() for e in entries]
    if not entries[0] or any(not e.strip() for e in entries):
      raise ValueError(f"{source}:{number}: empty synonym entry in {line!r}")
    lines.append(entries)
  if not lines:
    raise ValueError(f"{source}: no categories")
  return lines


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Everything that decides which caption words are objects and which category each names.

  Attributes:
    synonyms: One tuple per category, canonical name first.
    double_word_dict: Two-word phrase -> the word it is treated as.
    exclusions: (trigger, dropped) word pairs, see ``COCO_EXCLUSIONS``.
    style: "adhh" (AIR's reference: singularise at lookup) or "rohrbach" (singularise every token first).
  """

  synonyms: tuple[tuple[str, ...], ...]
  double_word_dict: Mapping[str, str]
  exclusions: tuple[tuple[str, str], ...] = ()
  style: str = "adhh"

  def __post_init__(self):
    if self.style not in STYLES:
      raise ValueError(f"unknown CHAIR style {self.style!r}; expected one of {STYLES}")
    inverse = {}
    for line in self.synonyms:  # later lines win, as in the reference
      for entry in line:
        inverse[entry] = line[0]
    object.__setattr__(self, "inverse_synonyms", inverse)

  @property
  def categories(self) -> list[str]:
    """Canonical category names in file order."""
    return [line[0] for line in self.synonyms]

  def category_of(self, name: str) -> str | None:
    """The canonical category of a synonym entry (``None`` if it is not one)."""
    return self.inverse_synonyms.get(name)

  @classmethod
  def from_synonyms(cls, lines: Sequence[Sequence[str]], *, rules: str = "auto", style: str = "adhh",
                    double_words: Iterable[str] | None = None) -> "Vocabulary":
    """Build a vocabulary from parsed synonym lines.

    Args:
      lines: As returned by ``parse_synonyms``.
      rules: "coco" = the reference's hard-coded MS-COCO rules (double words, baby/adult animals, passenger
        jet/train, bow tie, toilet seat); "generic" = double words are the file's two-word entries, no other
        rule; "auto" = "coco" when the canonical names are the 80 COCO categories, else "generic".
      style: See ``Vocabulary``.
      double_words: Extra phrases merged into one word (mapped to themselves), added to the rules'.
    """
    synonyms = tuple(tuple(line) for line in lines)
    if rules == "auto":
      rules = "coco" if [s[0] for s in synonyms] == _coco_categories() else "generic"
    if rules == "coco":
      table, exclusions = coco_double_word_dict(), COCO_EXCLUSIONS
    elif rules == "generic":
      table = {e.strip(): e.strip() for line in synonyms for e in line if len(e.split()) == 2}
      exclusions = ()
    else:
      raise ValueError(f"unknown vocabulary rules {rules!r}; expected 'auto', 'coco' or 'generic'")
    for phrase in double_words or ():
      table.setdefault(phrase, phrase)
    return cls(synonyms=synonyms, double_word_dict=table, exclusions=tuple(exclusions), style=style)

  @classmethod
  def from_file(cls, path: str | Path | None = None, *, rules: str = "auto", style: str = "adhh",
                strip_entries: bool = True) -> "Vocabulary":
    """Read a synonyms file (default: the COCO list shipped in ``eval/data``); see ``from_synonyms``."""
    path = Path(path) if path is not None else DEFAULT_SYNONYMS
    if not path.is_file():
      raise FileNotFoundError(f"synonyms file not found: {path}")
    lines = parse_synonyms(path.read_text(encoding="utf-8"), strip_entries=strip_entries, source=str(path))
    return cls.from_synonyms(lines, rules=rules, style=style)

  @classmethod
  def coco(cls, style: str = "adhh") -> "Vocabulary":
    """The reference MS-COCO vocabulary."""
    return cls.from_file(DEFAULT_SYNONYMS, rules="coco", style=style)

  def to_json(self) -> dict[str, Any]:
    """A JSON-able description (also what ``digest`` hashes)."""
    return {"synonyms": [list(s) for s in self.synonyms], "double_word_dict": dict(sorted(
      self.double_word_dict.items())), "exclusions": [list(e) for e in self.exclusions], "style": self.style}

  def digest(self) -> str:
    """SHA-256 of the vocabulary's content: changes whenever the metric's word matching would."""
    blob = json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _coco_categories() -> list[str]:
  return [line[0] for line in parse_synonyms(DEFAULT_SYNONYMS.read_text(encoding="utf-8"))]


# ---------------------------------------------------------------------------------------------------------
# Per-caption matching


@dataclasses.dataclass(frozen=True)
class CaptionObjects:
  """The object mentions of one caption.

  Attributes:
    words: Each mention as written (after double-word merging; singular in style "rohrbach").
    node_words: The category of each mention.
    idxs: Position in ``tokens`` where each mention starts.
    raw_words: All words of the caption after double-word merging (the reference's ``words`` output).
    tokens: ``word_tokenize(caption.lower())``.
  """

  words: list[str]
  node_words: list[str]
  idxs: list[int]
  raw_words: list[str]
  tokens: list[str]


def caption_to_words(caption: str, vocab: Vocabulary) -> CaptionObjects:
  """Find the object mentions of ``caption`` as the reference's ``caption_to_words`` does."""
  tokens = word_tokenize(caption.lower())
  at_lookup = vocab.style == "adhh"
  words = tokens if at_lookup else [singularize(t) for t in tokens]
  key = singularize if at_lookup else (lambda w: w)
  merged: list[tuple[str, int]] = []  # (word, index of its first token)
  i = 0
  while i < len(words):
    pair = key(" ".join(words[i:i + 2]))
    if pair in vocab.double_word_dict:
      merged.append((vocab.double_word_dict[pair], i))
      i += 2
    else:
      merged.append((words[i], i))
      i += 1
  raw_words = [w for w, _ in merged]
  for trigger, dropped in vocab.exclusions:
    present = {w for w, _ in merged}
    if trigger in present and dropped in present:
      merged = [(w, i) for w, i in merged if w != dropped]
  found = [(w, vocab.inverse_synonyms[key(w)], i) for w, i in merged if key(w) in vocab.inverse_synonyms]
  return CaptionObjects(words=[f[0] for f in found], node_words=[f[1] for f in found],
                        idxs=[f[2] for f in found], raw_words=raw_words, tokens=tokens)


def caption_objects(caption: str, vocab: Vocabulary) -> set[str]:
  """The categories a (ground-truth) caption names."""
  return set(caption_to_words(caption, vocab).node_words)


# ---------------------------------------------------------------------------------------------------------
# Scoring


def _ratio(num: float, den: float) -> float:
  return num / den if den else 0.0


def score_caption(image_id: Any, caption: str, gt_objects: Iterable[str], vocab: Vocabulary,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """One entry of the reference output's ``sentences`` list, with our additions.

  Args:
    image_id: The image's id.
    caption: Generated caption.
    gt_objects: Ground-truth categories of the image.
    vocab: Vocabulary.
    extra: Fields copied into the entry first (e.g. ``file_name``, ``method``).

  Returns:
    Reference fields ``image_id``, ``caption``, ``mscoco_hallucinated_words`` ([word, category] pairs),
    ``mscoco_gt_words``, ``mscoco_generated_words`` (categories, one per mention), ``hallucination_idxs``,
    ``words``, ``metrics`` {CHAIRs, CHAIRi, ...}; and ours: ``mscoco_non_hallucinated_words`` (as in AD-HH),
    ``correct_idxs``, ``tokens``.
  """
  gt = set(gt_objects)
  found = caption_to_words(caption, vocab)
  hallucinated, correct, hal_idxs, ok_idxs = [], [], [], []
  for word, node, idx in zip(found.words, found.node_words, found.idxs):
    if node in gt:
      correct.append([word, node])
      ok_idxs.append(idx)
    else:
      hallucinated.append([word, node])
      hal_idxs.append(idx)
  generated_unique = set(found.node_words)
  correct_unique = generated_unique & gt
  entry = dict(extra or {})
  entry.update({
    "image_id": image_id,
    "caption": caption,
    "mscoco_hallucinated_words": hallucinated,
    "mscoco_non_hallucinated_words": correct,
    "mscoco_gt_words": sorted(gt),
    "mscoco_generated_words": list(found.node_words),
    "hallucination_idxs": hal_idxs,
    "correct_idxs": ok_idxs,
    "words": found.raw_words,
    "tokens": found.tokens,
    "metrics": {
      "CHAIRs": int(bool(hallucinated)),
      "CHAIRi": _ratio(len(hallucinated), len(found.words)),
      "Recall": _ratio(len(correct_unique), len(gt)),
      "Precision": _ratio(len(correct_unique), len(generated_unique)),
      "Len": len(found.raw_words),
      "LenWords": _count_words(found.tokens),
    },
  })
  return entry


def _count_words(tokens: Sequence[str]) -> int:
  """Tokens that contain a letter or digit (punctuation tokens are not words)."""
  return sum(any(c.isalnum() for c in t) for t in tokens)


def overall_metrics(sentences: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Corpus-level metrics of scored sentences.

  ``CHAIRs`` and ``CHAIRi`` are the reference's. Ours, micro-averaged over captions on unique categories
  per caption: ``Recall`` = sum |generated & gt| / sum |gt| (OPERA's "Recall"), ``Precision`` =
  sum |generated & gt| / sum |generated| (differs from 1 - CHAIRi when an object is named repeatedly),
  ``F1`` their harmonic mean; ``Len`` = mean number of merged words per caption, punctuation included
  (OPERA's "Len"); ``avg_len_words`` = mean number of word tokens (no punctuation).
  """
  if not sentences:
    raise ValueError("no captions to score")
  mentions = sum(len(s["mscoco_generated_words"]) for s in sentences)
  hallucinated = sum(len(s["mscoco_hallucinated_words"]) for s in sentences)
  hit = gt_total = generated_total = 0
  for s in sentences:
    gen, gt = set(s["mscoco_generated_words"]), set(s["mscoco_gt_words"])
    hit += len(gen & gt)
    gt_total += len(gt)
    generated_total += len(gen)
  recall, precision = _ratio(hit, gt_total), _ratio(hit, generated_total)
  n = len(sentences)
  return {
    "CHAIRs": sum(s["metrics"]["CHAIRs"] for s in sentences) / n,
    "CHAIRi": _ratio(hallucinated, mentions),
    "Recall": recall,
    "Precision": precision,
    "F1": _ratio(2 * precision * recall, precision + recall),
    "Len": sum(s["metrics"]["Len"] for s in sentences) / n,
    "avg_len_words": sum(s["metrics"]["LenWords"] for s in sentences) / n,
    "num_captions": n,
    "num_object_mentions": mentions,
    "num_hallucinated_mentions": hallucinated,
  }


def compute_chair(captions: Iterable[Mapping[str, Any]], gt_objects: Mapping[Any, Iterable[str]],
                  vocab: Vocabulary) -> dict[str, Any]:
  """Score captions against ground truth: ``{"sentences": [...], "overall_metrics": {...}}``.

  Args:
    captions: Records with ``image_id`` and ``caption``; other fields are copied into the sentence entry.
    gt_objects: Image id -> ground-truth categories; every caption's image must be present.
    vocab: Vocabulary.
  """
  sentences = []
  for record in captions:
    image_id = record["image_id"]
    if image_id not in gt_objects:
      raise KeyError(f"no ground truth for image_id {image_id!r}")
    extra = {k: v for k, v in record.items() if k not in ("image_id", "caption")}
    sentences.append(score_caption(image_id, record["caption"], gt_objects[image_id], vocab, extra))
  return {"sentences": sentences, "overall_metrics": overall_metrics(sentences)}
