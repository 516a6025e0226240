"""Which caption tokens to score: the first sub-token of each CHAIR object mention.

Set H = hallucinated mentions (`mscoco_hallucinated_words`), set N = correctly mentioned objects
(`mscoco_non_hallucinated_words`), as in a CHAIR result's `sentences` entry (`eval.chair_metric.score_caption`).

How a mention is found in the caption (recorded per scored token as `locate`):
  "position": CHAIR's word index (`hallucination_idxs` / `correct_idxs`, an index into `tokens`, NLTK's word
    tokens of the lower-cased caption) -> that token's character span, found by aligning the tokens to the text;
  "text": fallback when there are no indices or the alignment fails: the k-th whole-word occurrence of the
    mention in the caption (k = how many earlier mentions have the same text);
  "token": the official tool's rule (`match="token"`): every caption token whose text equals the first
    sub-token of some H word (else of some N word), wherever it occurs.
With "position"/"text", the scored token is the first caption token whose character offsets overlap the span
(the fast tokenizer's offset mapping). A merged double word ("baby bird" -> "bird") is scored at its first
token ("baby"), where the mention starts.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

# NLTK's word_tokenize rewrites double quotes as `` and ''.
_QUOTE_FORMS = {"``": ('"', "``", "\u201c"), "''": ('"', "''", "\u201d")}


@dataclasses.dataclass
class ScoredToken:
  """One scored caption token.

  Attributes:
    set: "H" (hallucinated) or "N" (correctly mentioned object).
    word: the mention as CHAIR wrote it; category: its CHAIR category.
    word_index: CHAIR's token index of the mention (None when unknown).
    char_span: [start, end) of the mention in the caption (None for locate="token").
    token_index: index among the caption's tokens (slot = prompt length + token_index).
    token: the scored token's text; locate: "position", "text" or "token" (see the module docstring).
  """

  set: str
  word: str
  category: str
  word_index: int | None
  char_span: tuple[int, int] | None
  token_index: int
  token: str
  locate: str

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["char_span"] = None if self.char_span is None else list(self.char_span)
    return d


def caption_tokens(tokenizer, caption: str) -> tuple[list[int], list[tuple[int, int]]]:
  """Caption ids as generation produces them after the prompt (no special tokens) and their char offsets."""
  if not getattr(tokenizer, "is_fast", False):
    raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: character offsets are needed")
  enc = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)
  return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def align_words(text: str, words: Sequence[str]) -> list[tuple[int, int] | None]:
  """Character span of each NLTK token in `text` (left to right); None where a token cannot be placed."""
  spans: list[tuple[int, int] | None] = []
  cursor = 0
  for word in words:
    best = None
    for form in _QUOTE_FORMS.get(word, (word,)):
      at = text.find(form, cursor)
      # Only whitespace may be skipped; anything else means the tokens and the text diverged here.
      if at >= 0 and not text[cursor:at].strip() and (best is None or at < best[0]):
        best = (at, at + len(form))
    spans.append(best)
    if best is not None:
      cursor = best[1]
  return spans


def first_token_overlapping(offsets: Sequence[tuple[int, int]], span: tuple[int, int],
                            skip: Callable[[int], bool] | None = None) -> int | None:
  """Index of the first token whose [start, end) overlaps span (and that `skip` does not reject); None if none."""
  s, e = span
  for i, (a, b) in enumerate(offsets):
    if a < e and b > s and b > a and not (skip is not None and skip(i)):
      return i
  return None


def chair_mentions(sentence: Mapping[str, Any]) -> list[tuple[str, str, str, int | None]]:
  """(set, word, category, word index or None) of every object mention of a CHAIR sentence entry."""
  out = []
  for set_name, words_key, idx_keys in (("H", "mscoco_hallucinated_words", ("hallucination_idxs",)),
                                        ("N", "mscoco_non_hallucinated_words",
                                         ("correct_idxs", "non_hallucination_idxs"))):  # the second: AD-HH's
    words = sentence.get(words_key) or []
    idxs = next((sentence[k] for k in idx_keys if sentence.get(k) is not None), None)
    if idxs is not None and len(idxs) != len(words):
      idxs = None  # inconsistent entry: locate by text instead
    for n, item in enumerate(words):
      word, category = (item[0], item[1]) if isinstance(item, (list, tuple)) else (item, item)
      out.append((set_name, str(word), str(category), None if idxs is None else int(idxs[n])))
  return out


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
  return a[0] < b[1] and b[0] < a[1]


def _text_spans(text: str, word: str, exclude: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
  """Spans, in text order, of the whole-word occurrences of `word` in `text` and of the caption words whose
  singular (CHAIR's singulariser) is `word` (CHAIR outputs of the Rohrbach style record "dog" for "dogs", so
  "Dogs ... a dog" holds two mentions of "dog"), outside the `exclude` spans (other mentions' double words: "dog"
  is not the "dog" of "hot dog")."""
  pattern = r"(?<![\w])" + re.escape(word) + r"(?![\w])"
  exact = [(m.start(), m.end()) for m in re.finditer(pattern, text, flags=re.IGNORECASE)]
  return _merge_spans(exact, _singular_spans(text, word), exclude)


def _merge_spans(a, b, exclude) -> list[tuple[int, int]]:
  """The spans of a and b, each once, in text order, that overlap no `exclude` span."""
  return sorted({sp for sp in list(a) + list(b) if not any(_overlaps(sp, x) for x in exclude)})


def _singular_spans(text: str, word: str) -> list[tuple[int, int]]:
  """Spans of the caption words (runs of words for a double word) whose singular is `word` (or that equal it)."""
  from eval.chair_metric import singularize
  from eval.word_tokenize import word_tokenize

  lower, parts = text.lower(), word.lower().split()
  if len(lower) != len(text):
    return []
  tokens = word_tokenize(lower)
  spans = align_words(lower, tokens)
  found = []
  for i in range(len(tokens) - len(parts) + 1):
    window = spans[i:i + len(parts)]
    if all(sp is not None for sp in window) and all(
        t == p or singularize(t) == p for t, p in zip(tokens[i:i + len(parts)], parts)):
      found.append((window[0][0], window[-1][1]))
  return found


def _token_text(tokenizer, token_id: int) -> str:
  return tokenizer.decode([int(token_id)]).strip()


def scored_tokens(sentence: Mapping[str, Any], caption: str, tokenizer, ids: Sequence[int],
                  offsets: Sequence[tuple[int, int]], match: str = "span") -> list[ScoredToken]:
  """The caption tokens to score for one CHAIR sentence entry, sorted by token index.

  Args:
    sentence: CHAIR entry (words, categories and optionally indices and `tokens`).
    caption: the caption text the ids/offsets come from.
    tokenizer: the fast tokenizer.
    ids, offsets: `caption_tokens(tokenizer, caption)`.
    match: "span" (the mention's first sub-token, located by position or text) or "token" (official rule).
  """
  mentions = chair_mentions(sentence)
  out: dict[int, ScoredToken] = {}
  if match == "token":
    first = {}
    for set_name, word, category, _ in mentions:
      # The official tool takes the word's first sub-token; a bare word-boundary piece ("▁", empty once
      # decoded) would match every space, so the first piece with text stands in for it.
      texts = [_token_text(tokenizer, i) for i in tokenizer(word, add_special_tokens=False)["input_ids"]]
      head = next((x for x in texts if x), None)
      if head is not None:
        first.setdefault(set_name, {}).setdefault(head, (word, category))
    for i, tid in enumerate(ids):
      text = _token_text(tokenizer, tid)
      for set_name in ("H", "N"):  # a token in both sets counts as hallucinated, as in the official tool
        hit = first.get(set_name, {}).get(text)
        if hit is not None:
          out[i] = ScoredToken(set_name, hit[0], hit[1], None, None, i, text, "token")
          break
    return [out[i] for i in sorted(out)]
  if match != "span":
    raise ValueError(f"match must be 'span' or 'token', got {match!r}")
  lower = caption.lower()
  same_length = len(lower) == len(caption)  # lower() can change the length of a few characters
  words = sentence.get("tokens")
  spans = align_words(lower, words) if (words and same_length) else None
  seen: dict[str, int] = {}
  # Where the double words ("hot dog") of this entry stand: a single word is not looked for inside them.
  doubles = [sp for w in {m[1] for m in mentions if " " in m[1]} for sp in _text_spans(caption, w)]
  for set_name, word, category, idx in sorted(mentions, key=lambda m: (m[3] is None, m[3] or 0)):
    span, locate = None, "position"
    if spans is not None and idx is not None and 0 <= idx < len(spans):
      span = spans[idx]
    if span is None:
      locate = "text"
      found = _text_spans(caption, word, () if " " in word else doubles)
      k = seen.get(word, 0)
      span = found[k] if k < len(found) else None
    seen[word] = seen.get(word, 0) + 1
    if span is None:
      continue
    # A bare word-boundary piece ("▁", empty once decoded) is passed over, as token mode does.
    i = first_token_overlapping(offsets, span, skip=lambda j: not _token_text(tokenizer, ids[j]))
    if i is None or i in out:
      continue
    out[i] = ScoredToken(set_name, word, category, idx, span, i, _token_text(tokenizer, ids[i]), locate)
  return [out[i] for i in sorted(out)]
