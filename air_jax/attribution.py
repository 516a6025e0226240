"""Head attribution (AIR, A.1): Delta P_h of every attention head at the object tokens of a caption.

    attributor = Attributor(load_pretrained(path), semantics="current_token")
    result = attributor.attribute(image, chair_sentence)      # teacher-forced on sentence["caption"]
    stats = HeadStats.zeros(*result.ablated_logprob.shape[1:])
    result.accumulate(stats, score="prob")                    # then stats.s_score(), stats.e_score()

Pieces: `attribution_core` (vmapped ablations), `attribution_words` (which tokens are scored, sets H and N),
`attribution_stats` (streaming S_h / E_h, rankings), `heatmap` (PNG). The CLI is `python -m eval.attribute`.

Known difference from the official tool (current_token): when the scored token is the very first caption
token, the official re-forward runs the whole prompt with the hook (it is the prefill step), so the head is
removed at every prompt position; here it is removed only in the last prompt row, like every other position.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from air_jax.attribution_core import SCORES, SEMANTICS, delta_scores, head_logprobs
from air_jax.attribution_screen import screen_deltas, screen_logprobs
from air_jax.attribution_stats import HeadStats, rank_heads, select_heads, summary_arrays
from air_jax.attribution_words import ScoredToken, caption_tokens, scored_tokens
from air_jax.generate import _load_image, eos_token_ids, pad_token_id, prepare_inputs
from models.family import family_of

DEFAULT_PROMPT = "Please describe this image in detail."


@dataclasses.dataclass
class SampleResult:
  """Attribution of one caption.

  prompt_len: prompt tokens (the caption's token i sits at slot prompt_len + i); caption_ids: caption tokens;
  scored: the scored tokens (sets H/N); clean_logprob [P] and ablated_logprob [P, L, H]: log P of each scored
  token without and with each head removed.
  """

  caption: str
  prompt_len: int
  caption_ids: list[int]
  scored: list[ScoredToken]
  clean_logprob: np.ndarray
  ablated_logprob: np.ndarray | None
  semantics: str
  screen_grad: np.ndarray | None = None  # [P, L, H] dP/dg of the gradient screen (Attributor.screen)

  def deltas(self, score: str = "prob") -> np.ndarray:
    """Delta P_h [P, L, H] (see attribution_core.delta_scores); NaN for heads not ablated."""
    return delta_scores(self.clean_logprob, self.ablated_logprob, score)

  def screen_deltas(self, score: str = "prob") -> np.ndarray:
    """First-order Delta P_h [P, L, H] of the gradient screen (see attribution_screen.screen_deltas)."""
    return screen_deltas(self.clean_logprob, self.screen_grad, score)

  def accumulate(self, stats: HeadStats, score: str = "prob", screen: bool = False) -> None:
    """Adds this caption's scored tokens to `stats`, each to its set (the screen's estimates with `screen`)."""
    if not self.scored:
      return
    d = self.screen_deltas(score) if screen else self.deltas(score)
    sets = np.array([t.set for t in self.scored])
    for name in ("H", "N"):
      if (sets == name).any():
        stats.update(name, d[sets == name])

  def record(self) -> dict[str, Any]:
    """A JSON-able summary: the scored tokens with their clean probabilities."""
    scored = []
    for t, lp in zip(self.scored, self.clean_logprob):
      scored.append({**t.to_dict(), "slot": self.prompt_len + t.token_index, "clean_prob": float(np.exp(lp))})
    return {"caption": self.caption, "semantics": self.semantics, "prompt_tokens": self.prompt_len,
            "caption_tokens": len(self.caption_ids), "num_H": sum(t.set == "H" for t in self.scored),
            "num_N": sum(t.set == "N" for t in self.scored), "scored": scored}


def incremental_offsets(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
  """(text, char offsets) of generated ids by decoding growing prefixes (text = decode(ids).strip())."""
  full = tokenizer.decode(list(ids), skip_special_tokens=True)
  lead = len(full) - len(full.lstrip())
  text = full.strip()
  offsets, prev = [], 0
  for i in range(len(ids)):
    end = min(max(len(tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=True)) - lead, 0), len(text))
    offsets.append((prev, max(prev, end)))
    prev = max(prev, end)
  return text, offsets


# Default ablations per vectorised call: a current_token item holds one row, a full_sequence item a sequence.
DEFAULT_CHUNK = {"current_token": 256, "full_sequence": 16}

class Attributor:
  """Runs head attribution for one model (a LoadedModel with its processor)."""

  def __init__(self, model, *, semantics: str = "current_token", chunk: int | None = None, prompt: str = DEFAULT_PROMPT,
               backend: str | None = None, bucket: int = 32, layout: str = "auto"):
    """
    Args:
      model: `air_jax.load_pretrained(path)`.
      semantics: "current_token" (official) or "full_sequence".
      chunk: ablations per vectorised call (bounds memory: with current_token each holds one row's activations;
        with full_sequence, a whole sequence's). Default: 256 for current_token, 16 for full_sequence.
      prompt: the instruction the captions answered.
      backend: "cpu" | "gpu" | "tpu" (default: JAX's default); the first device is used.
      bucket: sequence-length bucket (fewer compilations).
      layout: "stacked" (scan over layers), "per_layer" (one buffer per layer: faster on CPU, where XLA reads
        slices of stacked weights slowly; holds a second copy of the decoder weights) or "auto" (per_layer for
        current_token on CPU, stacked otherwise).
    """
    from air_jax.backend import select_devices

    if semantics not in SEMANTICS:
      raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    if getattr(model, "processor", None) is None:
      raise TypeError("Attributor needs the object returned by air_jax.load_pretrained(path) with its processor")
    self.model, self.config, self.processor = model, model.config, model.processor
    chunk = chunk if chunk is not None else DEFAULT_CHUNK[semantics]
    self.semantics, self.chunk, self.prompt, self.bucket = semantics, chunk, prompt, bucket
    self.device = select_devices(backend)[0]
    params = model.params
    if layout == "auto":
      # full_sequence picks layers by dynamic index (attribution_reuse), which needs the stacked layout.
      cpu_decode = self.device.platform == "cpu" and semantics == "current_token"
      layout = "per_layer" if cpu_decode else "stacked"
    if layout == "per_layer":
      params = family_of(model.config).per_layer_params(params)
    elif layout != "stacked":
      raise ValueError(f"layout must be 'auto', 'stacked' or 'per_layer', got {layout!r}")
    self.params = jax.device_put(params, self.device)
    tok = self.processor.tokenizer
    self.pad_id = pad_token_id(tok)

  @property
  def num_layers(self) -> int:
    return self.config.dims.num_hidden_layers

  @property
  def num_heads(self) -> int:
    return self.config.dims.num_attention_heads

  def prompt_inputs(self, image) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids [Tp], pixel_values [1, C, H, W]) exactly as `air_jax.generate` builds them (no padding)."""
    ids, mask, pixels = prepare_inputs(self.processor, [_load_image(image)], [self.prompt], bucket=0,
                                       config=self.config)
    return ids[0][mask[0].astype(bool)], pixels

  def generate_caption(self, image, max_new_tokens: int = 64) -> tuple[str, list[int]]:
    """Greedy caption (text, token ids without EOS/padding) via `air_jax.generate`."""
    from air_jax.generate import generate

    out = generate(self.model, None, _load_image(image), self.prompt, max_new_tokens=max_new_tokens,
                   backend=self.device.platform)
    ids = [int(i) for i in out.token_ids[0][: int(out.num_tokens[0])]]
    eos = set(eos_token_ids(self.config, self.processor.tokenizer, getattr(self.model, "generation_eos", ())))
    while ids and ids[-1] in eos:
      ids.pop()
    return out.text, ids

  def caption_inputs(self, caption: str, token_ids: Sequence[int] | None = None):
    """(caption, ids, offsets): the caption's tokens as generation produces them and their char offsets.

    With `token_ids` (a generated caption) those ids are kept; offsets come from the tokenizer when
    re-encoding the text gives the same ids, else from decoding growing prefixes.
    """
    tok = self.processor.tokenizer
    ids, offsets = caption_tokens(tok, caption)
    if token_ids is not None and list(token_ids) != ids:
      caption, offsets = incremental_offsets(tok, token_ids)
      ids = list(token_ids)
    return caption, ids, offsets

  def _prepare(self, image, sentence, caption, token_ids, match):
    caption = sentence["caption"] if caption is None else caption
    caption, ids, offsets = self.caption_inputs(caption, token_ids)
    scored = scored_tokens(sentence, caption, self.processor.tokenizer, ids, offsets, match=match)
    prompt_ids, pixels = self.prompt_inputs(image)
    seq = np.concatenate([prompt_ids, np.asarray(ids, np.int32)]).astype(np.int32)
    positions = [len(prompt_ids) + t.token_index for t in scored]
    return caption, len(prompt_ids), ids, scored, seq, pixels, positions

  def attribute(self, image, sentence: Mapping[str, Any], *, caption: str | None = None,
                token_ids: Sequence[int] | None = None, match: str = "span", heads=None) -> SampleResult:
    """Delta P of every head at the object tokens of one caption (teacher-forced).

    Args:
      image: PIL image, array or path.
      sentence: CHAIR entry of the caption (`eval.chair_metric.score_caption` / a CHAIR JSON's `sentences`).
      caption: the text (default sentence["caption"]).
      token_ids: the generated ids of the caption, when known (see `caption_inputs`).
      match: "span" or "token" (see attribution_words).
      heads: optional flat head ids (layer * H + head) to ablate; the others are NaN (see `screen`).
    """
    caption, tp, ids, scored, seq, pixels, positions = self._prepare(image, sentence, caption, token_ids, match)
    nl, nh = self.num_layers, self.num_heads
    if not scored:
      return SampleResult(caption, tp, ids, [], np.zeros(0), np.zeros((0, nl, nh)), self.semantics)
    with jax.default_device(self.device):
      clean, ablated = head_logprobs(self.params, self.config, seq, pixels, positions, semantics=self.semantics,
                                     chunk=self.chunk, bucket=self.bucket, pad_id=self.pad_id, heads=heads)
    return SampleResult(caption, tp, ids, scored, clean, ablated, self.semantics)

  def screen(self, image, sentence: Mapping[str, Any], *, caption: str | None = None,
             token_ids: Sequence[int] | None = None, match: str = "span") -> SampleResult:
    """The gradient screen of one caption: dP/dg of every head at every scored token, one batched backward pass
    per token (air_jax.attribution_screen); `ablated_logprob` is None, `screen_grad` [P, L, H] holds the
    derivatives."""
    caption, tp, ids, scored, seq, pixels, positions = self._prepare(image, sentence, caption, token_ids, match)
    nl, nh = self.num_layers, self.num_heads
    if not scored:
      return SampleResult(caption, tp, ids, [], np.zeros(0), None, self.semantics, np.zeros((0, nl, nh)))
    with jax.default_device(self.device):
      clean, grad = screen_logprobs(self.params, self.config, seq, pixels, positions, semantics=self.semantics,
                                    bucket=self.bucket, pad_id=self.pad_id)
    return SampleResult(caption, tp, ids, scored, clean, None, self.semantics, grad)


__all__ = ["Attributor", "DEFAULT_PROMPT", "HeadStats", "SCORES", "SEMANTICS", "SampleResult", "ScoredToken",
           "delta_scores", "head_logprobs", "rank_heads", "screen_deltas", "screen_logprobs", "scored_tokens", "select_heads",
           "summary_arrays"]
