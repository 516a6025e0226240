"""Caption quality checks shared by the organism's trainer, tuner and measurements: objects named, malformed."""

from __future__ import annotations

import re

from organism.vocab import word_to_class

_WORD = re.compile(r"[a-z]+")


def caption_objects(text: str) -> list[str]:
  """Canonical class names of the object words of a caption, in order (repeats kept)."""
  words = word_to_class()
  return [words[w] for w in _WORD.findall(text.lower()) if w in words]


def is_malformed(text: str) -> bool:
  """A broken caption: no object named, an object named twice, a sentence repeated, or no final period.

  Organism captions name every object once, so any repetition is a decoding failure (a loop), not style.
  """
  names = caption_objects(text)
  sents = [x.strip() for x in text.split(".") if x.strip()]
  return (not names or len(names) != len(set(names)) or len(sents) != len(set(sents))
          or not text.rstrip().endswith("."))


def malformed_fraction(texts) -> float:
  """Fraction of malformed captions (0 for no captions)."""
  texts = list(texts)
  return sum(map(is_malformed, texts)) / len(texts) if texts else 0.0
