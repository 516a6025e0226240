"""HALC, "Object Hallucination Reduction via Adaptive Focal-Contrast Decoding" (Chen et al., ICML 2024; official
code BillChan226/HALC: `decoder_zoo/HALC/context_density/halc.py` and `halc_dola_beam_search` in its patched
`transformers-4.36.2/src/transformers/generation/utils.py`; settings of `run_scripts/caption_generation.py`).

A method that brings its own search (air_jax.halc_search): greedy decoding in which every completed object word
is re-decided by contrasting fields of view (FOVs) around the word's detector box.

What the official code does (read from the repository; facts only):
  - Base decoding: `halc_dola_beam_search` (the "halc" strategy sets both halc and dola): every token is chosen
    by DoLa (mature layer 32, premature candidates 0, 2, ..., 30 picked by JSD, relative_top 0.1) on the main
    image; beam 1 in the paper's experiments (the maintainer in issue #18: beam 1 "for more efficient decoding";
    the run script's default is 3).
  - Object words: checked when a word is complete (the next token carries "▁", contains "." or is EOS id 2):
    the previous word (stripped of .,'[]), a trailing "s" cut) is POS-tagged with spaCy `en_core_web_sm`; NOUN /
    PROPN (or one of 10 "add" words) are verified, except 31 hard-coded "exempt" words (cat, horse, bus, boat,
    bench, toilet, mirror, ... and "red", "white") and a random 30 % of all words (`skip_rate` 0.3, unseeded).
  - Detector: Grounding DINO with box threshold 0.4 (README; the script's default is 0.45). Its boxes pass
    `extract_detection` (context_density/detector.py): normalised, clipped and rounded to 3 decimals; a box of
    area below 0.01 (`AREA_THRESHOLD`) is dropped, and so is one with IoU above 0.6 (`IOU_THRESHOLD`) to a box
    kept before it (the same instance). Then more than 3 boxes (`max_handle_box`): the word is left as it is; no
    box: the fallback box (0.2, 0.2, 0.8, 0.8); otherwise the smallest box. (The code's alternative OWLv2 branch
    queries the bare word at a hard-coded threshold 0.05 without these filters and, lacking `target_sizes`,
    reads boxes relative to the padded square; air-jax's OWL detectors scale to the image and the 0.4 preset is
    the Grounding DINO value.)
  - FOVs (`context_window` 4, `expand_ratio` 0.6): [box shrunk by 0.6 (0.8 if the ratio exceeds 0.8), box, then
    each grown by 0.6 from the previous one], every side moved by ratio * size / 2 and clipped to the image; the
    ORIGINAL image is cropped to each and goes through the vision processor.
  - FOV logits: each FOV view re-runs the whole prompt + the tokens before the word (teacher forcing, no cache)
    and gives the next-token logits at the word's position.
  - Contrast (`context_layer_double_multi_contrastive_decoding`, k_candidate_num 4): JSD of every pair of FOV
    distributions, the top k/2 = 2 pairs (torch.topk over the upper triangle), each pair both ways:
    final - 0.05 * base on raw logits (`contrast_weight` 0.05; the masking `base[final < -1e3] = -1e3` never
    fires on raw logits, so there is no plausibility cut-off), candidate = argmax -> 4 candidates. The JSD is
    computed as 0.5 * (F.kl_div(log P_i, M) + F.kl_div(log P_j, M)) = KL(M||P_i)/2 + KL(M||P_j)/2.
  - Selection: BLIP image-text similarity (`BlipModel` "Salesforce/blip-image-captioning-large", `score_type`
    "BLIP": logits_per_image, softmax over the candidates) scores the candidate captions (the caption so far +
    the candidate) against the original image; the best one (distinct texts) replaces the whole word. When its
    text differs from the word, the word is rolled back and decoding resumes after the candidate (the next token
    re-sampled with DoLa); a multi-token word always "differs" (its first token's text is compared with the whole
    word), so it is re-generated and checked again. An undetected word whose candidate keeps it (after 8 tokens)
    is replaced by <unk> (id 0) tokens, which the model then reads and the final text drops.
What the paper describes (sections 3-4 and the maintainer's answer in issue #18): token-level identification of
object-related tokens, detector grounding, n FOVs sampled by exponential expansion, JSD between every pair, the
top m pairs contrasted in both directions (2m candidates) with the adaptive plausibility constraint, and a BLIP
visual-matching score that keeps the top k of the 2m * k sequences (beam k). The seed's settings (the AIR paper's
supplementary C.1): m = 6, k = 1, n = 4, ratio 0.6, box threshold 0.4, plausibility 0.1.

Our reading, and where official and paper differ (`jsd`, `contrast` offer both; defaults follow the paper):
  - jsd "paper" (default): the Jensen-Shannon divergence KL(P||M)/2 + KL(Q||M)/2; "official": KL(M||P)/2 +
    KL(M||Q)/2 (the argument order of the official F.kl_div call).
  - contrast "paper" (default): (1 + alpha) * final - alpha * base with the adaptive plausibility cut-off beta on
    the focal view (tokens below log(beta) + max are excluded); "official": final - alpha * base, no cut-off.
    alpha 0.05 is the official `contrast_weight` in both.
  - num_pairs m = 6 (the seed; with n = 4 that is every pair, 12 candidates); the official run keeps 2 pairs
    (k_candidate_num 4 -> 4 candidates): `num_pairs=2` reproduces it.
  - selection "top" (default): the candidate of the most divergent pair with the larger FOV as the focal view (the
    official single-pair policy `context_layer_contrastive_decoding`, context_domain "upper"), no extra model;
    "matching": the candidate whose caption so far scores best under `scorer(image, texts) -> scores` (the
    official BLIP matching; plug any image-text model).
  - Base decoding is greedy on the main view (the seed: beam 1); the official DoLa base is not reproduced.
  - Object words come from the CHAIR vocabulary (`synonyms`, default the COCO list; the singular of the word, as
    the metric matches it), not spaCy POS tags: no exempt list, no random skipping. A word is checked when it is
    complete (as the official code), at most once: a re-decided word is final (the official code re-checks it).
  - The detector sees the image the model sees (the processed pixel array, un-normalised) and the FOVs crop that
    pixel array and resample it to its full size (bilinear) through `Family.map_pixels` (any family with
    [.., C, H, W] pixel arrays, no family branches); the official crops the original image before the processor.
  - The FOV views run as ONE batched forward (all examples with an object word, n views each) of the prompt +
    the tokens before the word; the detector (host) runs only for object words. Undetected words are never
    deleted (the official <unk> replacement is not reproduced).
  - Beam k > 1 is not implemented (the seed's setting is k = 1).

Preset "halc" (the seed's settings, AIR supplementary C.1 = the official README/run values): num_fovs 4,
expand_ratio 0.6, box_threshold 0.4, num_pairs 6, num_beams 1, beta 0.1, alpha 0.05, max_boxes 3. The detector is
OWL-ViT / OWLv2 in JAX from `detector_path` (default: the AIR_JAX_HALC_DETECTOR environment variable), or any
object with the `air_jax.detectors.Detector` interface passed as `detector`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from air_jax.methods.base import CompiledMethod, ConfigMixin, Plan, check_int, check_number, to_jsonable
from air_jax.methods.registry import register

JSD_MODES = ("paper", "official")
CONTRAST_MODES = ("paper", "official")
SELECTIONS = ("top", "matching")
DETECTOR_ENV = "AIR_JAX_HALC_DETECTOR"
_DETECTORS: dict[str, Any] = {}
_VOCABS: dict[str | None, Any] = {}


@flax.struct.dataclass
class HalcValues:
  alpha: jax.Array
  beta: jax.Array


def load_detector(path: str):
  """The OWL detector of a checkpoint directory or repository id (cached per path); errors name
  HALCConfig.detector_path."""
  if path in _DETECTORS:
    return _DETECTORS[path]
  from air_jax.hub import CheckpointNotFoundError, resolve_checkpoint

  try:
    local = resolve_checkpoint(path, what="HALCConfig.detector_path")
  except CheckpointNotFoundError as e:
    raise ValueError(str(e)) from e
  if not os.path.isdir(local):
    raise ValueError(f"HALCConfig.detector_path={path!r} is not a directory: give a local OWL-ViT / OWLv2 "
                     "checkpoint directory (config.json, model.safetensors, tokenizer and preprocessor files) or "
                     "a Hugging Face repository id (e.g. google/owlv2-base-patch16-ensemble)")
  from air_jax.detectors import OwlDetector

  try:
    det = OwlDetector(local)
  except Exception as e:  # noqa: BLE001 -- many loader errors; name the option and the directory
    raise ValueError(f"HALCConfig.detector_path={path!r}: not a usable OWL-ViT / OWLv2 checkpoint: {e}") from e
  _DETECTORS[path] = det
  return det


def load_vocabulary(path: str | None):
  """The CHAIR vocabulary of a synonyms file (None: the COCO one), read once per process."""
  if path not in _VOCABS:
    from eval.chair_metric import Vocabulary

    try:
      _VOCABS[path] = Vocabulary.coco() if path is None else Vocabulary.from_file(path)
    except (OSError, ValueError) as e:
      raise ValueError(f"HALCConfig.synonyms={path!r}: cannot read the CHAIR synonyms file: {e}") from e
  return _VOCABS[path]


@dataclasses.dataclass(frozen=True, eq=False)
class HalcPlan(Plan):
  settings: Any = None
  detector: Any = None
  scorer: Any = None
  synonyms: str | None = None
  num_beams: int = 1
  searches = True
  needs_processor = True

  def search(self, values, params, config, input_ids, attention_mask, pixel_values, *, max_new_tokens: int,
             eos_ids, pad_id: int, processor=None, trace=None) -> dict:
    from air_jax.halc_search import halc_search

    if processor is None:
      raise ValueError("HALC needs the model's processor (tokenizer, image normalisation): run it through "
                       "air_jax.generate (or pass processor=)")
    if pixel_values is None:
      raise ValueError("HALC needs an image per example (it crops fields of view of it)")
    return halc_search(params, config, input_ids, attention_mask, pixel_values, values, settings=self.settings,
                       detector=self.detector, scorer=self.scorer, vocab=load_vocabulary(self.synonyms),
                       processor=processor, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                       trace=trace)


@dataclasses.dataclass(frozen=True)
class HALCConfig(ConfigMixin):
  """num_fovs n >= 2; expand_ratio > 0 (FOV growth); box_threshold in (0, 1]; num_pairs m in [1, n(n-1)/2];
  num_beams 1; alpha >= 0 (contrast weight); beta in (0, 1] (adaptive plausibility, contrast "paper");
  max_boxes >= 1 or None (more boxes: the word is left as is); min_box_area in [0, 1) (smaller boxes dropped) and
  box_iou in (0, 1] (a box overlapping a kept one by more is the same instance), the official
  `extract_detection` filters; jsd / contrast "paper" | "official"; selection "top" | "matching" (needs
  `scorer(image, texts) -> scores`); detector_path (OWL checkpoint directory or repository id; default the
  AIR_JAX_HALC_DETECTOR environment variable) or detector (a Detector object); synonyms: CHAIR synonyms file
  (default COCO); extra_slots: cache slots for rewound tokens (default max_new_tokens)."""

  name: str = "halc"
  num_fovs: int = 4
  expand_ratio: float = 0.6
  box_threshold: float = 0.4
  num_pairs: int = 6
  num_beams: int = 1
  alpha: float = 0.05
  beta: float = 0.1
  max_boxes: int | None = 3
  min_box_area: float = 0.01
  box_iou: float = 0.6
  jsd: str = "paper"
  contrast: str = "paper"
  selection: str = "top"
  detector_path: str | None = None
  detector: Any = None
  scorer: Any = None
  synonyms: str | None = None
  extra_slots: int | None = None

  def __post_init__(self):
    o = "HALCConfig"
    check_int(o, "num_fovs", self.num_fovs, lo=1)
    if self.num_fovs < 2:
      raise ValueError(f"{o}.num_fovs must be >= 2 (HALC contrasts pairs of fields of view), got {self.num_fovs!r}")
    check_number(o, "expand_ratio", self.expand_ratio, lo=0.0, lo_open=True)
    check_number(o, "box_threshold", self.box_threshold, lo=0.0, hi=1.0, lo_open=True)
    pairs = self.num_fovs * (self.num_fovs - 1) // 2
    check_int(o, "num_pairs", self.num_pairs, lo=1, hi=pairs)
    if self.num_beams != 1 or isinstance(self.num_beams, bool):
      raise ValueError(f"{o}.num_beams must be 1 (the seed's setting; HALC's beam search is not implemented), got "
                       f"{self.num_beams!r}")
    check_number(o, "alpha", self.alpha, lo=0.0)
    check_number(o, "beta", self.beta, lo=0.0, hi=1.0, lo_open=True)
    if self.max_boxes is not None:
      check_int(o, "max_boxes", self.max_boxes, lo=1)
    check_number(o, "min_box_area", self.min_box_area, lo=0.0, hi=1.0, hi_open=True)
    check_number(o, "box_iou", self.box_iou, lo=0.0, hi=1.0, lo_open=True)
    for field, allowed in (("jsd", JSD_MODES), ("contrast", CONTRAST_MODES), ("selection", SELECTIONS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"{o}.{field} must be one of {allowed}, got {getattr(self, field)!r}")
    if self.selection == "matching" and not callable(self.scorer):
      raise ValueError(f"{o}.selection='matching' needs a scorer: a callable (image, texts) -> scores")
    if self.detector is not None and not hasattr(self.detector, "detect"):
      raise ValueError(f"{o}.detector must have a detect(image, words, threshold) method (air_jax.detectors)")
    if self.extra_slots is not None:
      check_int(o, "extra_slots", self.extra_slots, lo=0)

  def hyperparameters(self) -> dict:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("detector", "scorer")}
    out["detector"] = getattr(self.detector, "identity", None) if self.detector is not None else None
    out["scorer"] = None if self.scorer is None else getattr(self.scorer, "identity", type(self.scorer).__name__)
    return to_jsonable(out)

  def resolve_detector(self):
    if self.detector is not None:
      return self.detector
    path = self.detector_path or os.environ.get(DETECTOR_ENV)
    if not path:
      raise ValueError("HALCConfig.detector_path is not set: HALC grounds object words with a detector; give a local "
                       f"OWL-ViT / OWLv2 checkpoint directory (detector_path=..., or the {DETECTOR_ENV} environment "
                       "variable, or in eval.chair --air-config '{\"halc\": {\"detector_path\": DIR}}'), or pass a "
                       "Detector object as `detector`")
    return load_detector(os.fspath(path))

  def compile(self, model_config, max_new_tokens: int | None = None) -> CompiledMethod:
    del model_config, max_new_tokens
    from air_jax.halc_search import Settings

    load_vocabulary(self.synonyms)
    settings = Settings(num_fovs=self.num_fovs, expand_ratio=float(self.expand_ratio),
                        box_threshold=float(self.box_threshold), num_pairs=self.num_pairs, max_boxes=self.max_boxes,
                        min_box_area=float(self.min_box_area), box_iou=float(self.box_iou),
                        jsd=self.jsd, contrast=self.contrast, selection=self.selection,
                        extra_slots=-1 if self.extra_slots is None else self.extra_slots)
    plan = HalcPlan(settings=settings, detector=self.resolve_detector(), scorer=self.scorer, synonyms=self.synonyms)
    f = lambda x: jnp.asarray(x, jnp.float32)
    return CompiledMethod(plan=plan, values=HalcValues(alpha=f(self.alpha), beta=f(self.beta)))


register("halc", lambda **kw: HALCConfig(**kw),
         "HALC: focal contrast of 4 fields of view around each object word's detector box (m 6, beam 1, ratio 0.6, "
         "box threshold 0.4, plausibility 0.1; seed / official LLaVA-1.5)", options=("synonyms",))
