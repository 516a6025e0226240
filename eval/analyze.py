"""The seed's analyses on a model and a captioning split: JSON + PNG outputs.

  python -m eval.analyze                                        # the embedded organism, a few minutes on CPU
  python -m eval.analyze --model DIR --coco-root COCO --heads heads.json --base-llm VICUNA_DIR \
      --methods-json bench/results/methods.json --num-images 50 --no-sweeps

Sections (each writes into `<out>/analysis.json` and a figure):
  similarity  A.2  LVLM vs base-LLM attention on the output tokens, S_hal / S_non   (similarity.png)
  propagation B.1  tr(W), tr(W^2), xi, eta, theta*, rho(theta) per head + Monte Carlo (propagation.png)
  variance    B.2  row variance and entropy of the generating rows, their correlation (variance_entropy.png)
  mai / tai        modality- and token-wise imbalance, high-TAI tokens, distance to the next hallucination
                   (mai.png, attention_grid.png)
  heatmap          E_h of the attribution (heads_E.png), when an attribution .npz is given / shipped
  sweeps      C.2  C_S / C_I against lambda, gamma, tau_text, beta (vmapped sweeps; sensitivity.png; resumable)
  cost        C.3  time per caption per method from the methods benchmark JSON (cost.png)
With no --model and no --coco-root, the organism checkpoint, its held-out scenes (seed 0), heads.json,
air_config.json and heads_attribution.npz are used.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from eval.cli import check_output_dir, releases_output_locks

log = logging.getLogger("eval.analyze")
PROMPT = "Please describe this image in detail."
SECTIONS = ("similarity", "propagation", "variance", "tai", "mai", "heatmap", "sweeps", "cost")
DEFAULT_METHODS_JSON = Path(__file__).resolve().parent.parent / "bench" / "results" / "methods.json"


class AnalyzeError(RuntimeError):
  """A user-facing error: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m eval.analyze", description=__doc__.splitlines()[0])
  p.add_argument("--model", help="LVLM checkpoint directory or Hugging Face repository id (air_jax.load_pretrained); "
                                  "default: the organism")
  p.add_argument("--coco-root", help="COCO-style root; default: the organism's held-out scenes")
  p.add_argument("--split", default=None, help="default val2014 (test for the organism)")
  p.add_argument("--synonyms", help="CHAIR vocabulary (default COCO's; the organism's for the organism)")
  p.add_argument("--num-images", type=int, default=24, help="captions for the attention analyses (default 24)")
  p.add_argument("--seed", type=int, default=42, help="image sample seed (eval.chair's)")
  p.add_argument("--prompt", default=PROMPT)
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--heads", help="heads JSON {hal_heads, non_hal_heads} (sensitive / insensitive heads)")
  p.add_argument("--attribution", help="attribution .npz of eval.attribute (for the E_h heatmap)")
  p.add_argument("--air-config", help="JSON {'air': {AIRConfig field: value}}: the base of the sweeps")
  p.add_argument("--base-llm", default="self",
                 help="A.2 base LLM: a LlamaForCausalLM directory (or repository id) sharing the LVLM's vocabulary, or "
                      "'self' (the "
                      "LVLM's own language model with the image replaced by one placeholder token; default)")
  p.add_argument("--methods-json", default=None,
                 help=f"methods benchmark JSON for C.3 (default {DEFAULT_METHODS_JSON} when it exists)")
  p.add_argument("--sweep-images", type=int, default=100,
                 help="held-out images per sweep config, none of them analysed above (default 100)")
  p.add_argument("--sweep-grid", help="JSON {knob: [values]} (knobs lambda, gamma, tau_text, beta)")
  p.add_argument("--batch-size", type=int, default=50)
  p.add_argument("--sigma", choices=("both", "identity"), default="both",
                 help="B.1 Sigma: identity and Assumption 1's random-walk step covariance, estimated from the "
                      "differences of consecutive layer inputs (both, default), or identity only (the covariance "
                      "needs L x E x E float64: 4.3 GB for a 7B model)")
  p.add_argument("--mc-draws", type=int, default=2000, help="Monte Carlo walks per checked head (B.1)")
  p.add_argument("--mc-tokens", type=int, default=64, help="T of the Monte Carlo walks (B.1)")
  p.add_argument("--tai-top-k", type=int, default=3, help="high-TAI tokens kept per caption (default 3)")
  p.add_argument("--tai-threshold", type=float, default=None, help="and only those with TAI >= this")
  p.add_argument("--tai-heads", choices=("all", "sensitive"), default="all",
                 help="heads whose attention TAI averages (sensitive: those of --heads)")
  p.add_argument("--tai-window", type=int, default=15, help="tokens within which a hallucination counts (TAI)")
  p.add_argument("--grid-caption", type=int, default=0, help="which analysed caption the attention grid shows")
  p.add_argument("--grid-layers", help="comma-separated layers of the attention grid (default: up to 4 spread)")
  p.add_argument("--grid-heads", help="comma-separated heads of the attention grid (default: up to 8)")
  p.add_argument("--skip", action="append", default=[], help=f"sections to skip: {', '.join(SECTIONS)}")
  p.add_argument("--no-sweeps", action="store_true", help="same as --skip sweeps")
  p.add_argument("--out", default="results/analysis")
  return p


def apply_defaults(args: argparse.Namespace) -> None:
  """Organism defaults when neither --model nor --coco-root is given; checks the rest."""
  from eval.cli import resolve_model_flag

  if args.model is None and args.coco_root is None:
    from eval import organism_default as od

    if not od.CHECKPOINT.is_dir():
      raise AnalyzeError(f"the organism checkpoint is missing at {od.CHECKPOINT}")
    root = od.ensure_dataset(Path(args.out) / "organism_data")
    args.model, args.coco_root = str(od.CHECKPOINT), str(root)
    args.split = args.split or "test"
    args.synonyms = args.synonyms or str(root / "synonyms.txt")
    args.heads = args.heads or (str(od.HEADS) if od.HEADS.is_file() else None)
    args.air_config = args.air_config or (str(od.AIR_CONFIG) if od.AIR_CONFIG.is_file() else None)
    npz = od.CHECKPOINT / "heads_attribution.npz"
    args.attribution = args.attribution or (str(npz) if npz.is_file() else None)
    args.organism = True
  else:
    if args.model is None or args.coco_root is None:
      raise AnalyzeError("give both --model and --coco-root (or neither, for the organism)")
    args.organism = False
  args.split = args.split or "val2014"
  if args.no_sweeps:
    args.skip.append("sweeps")
  bad = [s for s in args.skip if s not in SECTIONS]
  if bad:
    raise AnalyzeError(f"--skip {bad}: unknown section(s); expected {', '.join(SECTIONS)}")
  if args.methods_json is None and DEFAULT_METHODS_JSON.is_file():
    args.methods_json = str(DEFAULT_METHODS_JSON)
  if not Path(args.coco_root).is_dir():
    raise AnalyzeError(f"--coco-root {args.coco_root}: not a directory")
  args.model = resolve_model_flag(args.model)
  for flag in ("heads", "attribution", "air_config", "methods_json", "synonyms"):
    value = getattr(args, flag)
    if value is not None and not Path(value).is_file():
      raise AnalyzeError(f"--{flag.replace('_', '-')} {value}: file not found")
  if args.base_llm != "self":
    args.base_llm = resolve_model_flag(args.base_llm, "--base-llm")
  if args.num_images < 1:
    raise AnalyzeError(f"--num-images must be at least 1, got {args.num_images}")


# ---------------------------------------------------------------------------------------------------------
# Captions and CHAIR


class Split:
  """Images, ground truth and CHAIR vocabulary of one split."""

  def __init__(self, args):
    from eval.chair_metric import Vocabulary
    from eval.coco import CocoImages, GroundTruth

    self.vocab = Vocabulary.from_file(args.synonyms)
    self.images = CocoImages(args.coco_root, args.split)
    self.gt = GroundTruth(args.coco_root, args.split, self.vocab, cache_dir=Path(args.out) / "cache")

  def sample(self, n: int, seed: int, exclude: Sequence = ()) -> list:
    """eval.chair's seeded sample of min(n, available) image ids; with `exclude`, the same seeded draw from the
    ids not in it (deterministic), so the sweeps never reuse an analysed scene."""
    if not exclude:
      return self.images.sample(min(n, len(self.images.ids)), seed)
    skip = set(exclude)
    pool = [i for i in self.images.ids if i not in skip]
    if not pool:
      raise AnalyzeError(f"no images of the split ({len(self.images.ids)}) are left after excluding the "
                         f"{len(skip)} analysed ones")
    return random.Random(seed).sample(pool, min(n, len(pool)))

  def load(self, ids) -> list:
    from PIL import Image

    out = []
    for i in ids:
      with Image.open(self.images.image_path(i)) as im:
        out.append(im.convert("RGB"))
    return out

  def score(self, ids, texts) -> dict:
    from eval.chair_metric import compute_chair

    return compute_chair([{"image_id": i, "caption": t} for i, t in zip(ids, texts)], self.gt.objects(ids),
                         self.vocab)


def caption_ids(model, gen, b: int) -> list[int]:
  """The generated ids of caption b without EOS and padding."""
  from air_jax.generate import eos_token_ids

  eos = set(eos_token_ids(model.config, model.processor.tokenizer))
  ids = [int(t) for t in gen.token_ids[b][: int(gen.num_tokens[b])]]
  while ids and ids[-1] in eos:
    ids.pop()
  return ids


def hallucinated_positions(model, sentence, ids) -> list[int]:
  """Caption token indices where a CHAIR-hallucinated object mention starts."""
  from air_jax.attribution import incremental_offsets
  from air_jax.attribution_words import caption_tokens, scored_tokens

  tok = model.processor.tokenizer
  text = sentence["caption"]
  enc_ids, offsets = caption_tokens(tok, text)
  if enc_ids != ids:
    text, offsets = incremental_offsets(tok, ids)
  return sorted(t.token_index for t in scored_tokens(sentence, text, tok, ids, offsets) if t.set == "H")


# ---------------------------------------------------------------------------------------------------------
# Per-caption attention pass


def _bucketed(seq: np.ndarray, bucket: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads one sequence to a multiple of `bucket` (mask 0): causal rows before the pad are unchanged."""
  s = len(seq)
  t = -(-s // bucket) * bucket
  ids = np.zeros((1, t), np.int32)
  ids[0, :s] = seq
  mask = np.zeros((1, t), np.int32)
  mask[0, :s] = 1
  return ids, mask


def text_only_ids(seq: np.ndarray, image_token_id: int, placeholder: Sequence[int]) -> np.ndarray:
  """The sequence with each run of image tokens replaced by `placeholder` ids (the LLM side of A.2)."""
  out, prev = [], False
  for t in seq:
    is_img = int(t) == image_token_id
    if is_img and not prev:
      out.extend(int(p) for p in placeholder)
    elif not is_img:
      out.append(int(t))
    prev = is_img
  return np.asarray(out, np.int32)


def base_placeholder(model, base) -> list[int]:
  """Ids standing for the image in the base LLM's input: the image token itself for 'self'; for a separate
  LLM, its tokenizer's encoding of the processor's image token text (or the image id if it is in its vocab)."""
  image_id = model.config.image_token_id
  if base is model:
    return [image_id]
  tok = getattr(base, "processor", None)
  if tok is not None:
    text = model.processor.tokenizer.convert_ids_to_tokens(image_id)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if ids:
      return list(ids)
  from air_jax.analysis.model_io import text_config

  vocab = text_config(base).vocab_size
  if image_id < vocab:
    return [image_id]
  raise AnalyzeError(f"the base LLM's vocabulary ({vocab}) has no image token id {image_id} "
                     "and it ships no tokenizer to spell a placeholder")


def attention_pass(model, base, placeholder, prompt_ids, pixels, cap_ids) -> dict[str, Any]:
  """Attention [L, H, S, S], value norms [L, H, S], layer states [L, S, E] (with the image) and the base LLM's
  attention on the text-only sequence."""
  from air_jax.analysis import model_io

  seq = np.concatenate([prompt_ids, np.asarray(cap_ids, np.int32)])
  s = len(seq)
  ids, mask = _bucketed(seq)
  attn = model_io.decoder_attentions(model, ids, mask, pixels)[:, 0, :, :s, :s]
  states, norms = model_io.layer_inputs(model, ids, mask, pixels)
  llm_seq = text_only_ids(seq, model.config.image_token_id, placeholder)
  vocab = model_io.text_config(base).vocab_size
  if llm_seq.max() >= vocab:
    raise AnalyzeError(f"token id {int(llm_seq.max())} is outside the base LLM's vocabulary ({vocab}): A.2 needs a "
                       "base LLM that shares the LVLM's tokenizer (e.g. Vicuna for LLaVA-1.5)")
  lids, lmask = _bucketed(llm_seq)
  llm_attn = model_io.decoder_attentions(base, lids, lmask, None)[:, 0, :, :len(llm_seq), :len(llm_seq)]
  return {"attn": attn, "value_norms": norms[:, 0, :, :s], "states": states[:, 0, :s], "llm_attn": llm_attn,
          "seq": seq}


# ---------------------------------------------------------------------------------------------------------
# Sections


def _heads(args, nl: int, nh: int) -> tuple[list, list]:
  from air_jax.air_config import read_heads_file

  if args.heads is None:
    return [], []
  try:
    hal = [tuple(h) for h in read_heads_file(args.heads, "hal_heads")]
  except ValueError as e:
    raise AnalyzeError(f"--heads: {e}") from e
  try:
    non = [tuple(h) for h in read_heads_file(args.heads, "non_hal_heads")]
  except ValueError:  # optional: files listing only the sensitive heads are fine
    non = []
  for layer, head in hal + non:
    if not (0 <= layer < nl and 0 <= head < nh):
      raise AnalyzeError(f"--heads {args.heads}: head ({layer}, {head}) is outside the model's {nl} x {nh} heads")
  return hal, non


def _grid_choice(spec: str | None, n: int, most: int) -> list[int]:
  if spec:
    vals = [int(v) for v in spec.split(",") if v.strip()]
    bad = [v for v in vals if not 0 <= v < n]
    if bad:
      raise AnalyzeError(f"grid indices {bad} are outside [0, {n})")
    return vals
  if n <= most:
    return list(range(n))
  return sorted({int(round(x)) for x in np.linspace(0, n - 1, most)})


def propagation_section(model, steps, hal, non, args, out_dir, fig) -> dict:
  """B.1 per head with Sigma = identity and (given `steps`, a `propagation.StepCovariance` of the layer inputs)
  Sigma = the step covariance of each layer; Monte Carlo check of eq. (1) on up to two heads."""
  from air_jax.analysis import model_io, propagation as pr

  cfg = model_io.text_config(model)
  d, nl = cfg.head_dim, cfg.num_hidden_layers
  cov = steps.covariance() if steps is not None else None  # [L, E, E]
  # One layer at a time from the (query, key) factors: never an E x E matrix per head.
  spectra = {"identity": [], "step_covariance": []}
  factors = {}
  for layer in range(nl):
    a, b = model_io.qk_factors(model, layer)
    factors[layer] = (a, b)
    spectra["identity"].append(pr.spectrum_from_factors(a, b, d))
    if cov is not None:
      spectra["step_covariance"].append(pr.spectrum_from_factors(a, b, d, cov[layer]))

  def stacked(parts):
    return pr.Spectrum(np.stack([p.tr_w for p in parts]), np.stack([p.tr_w2 for p in parts]), d)

  tables = {name: pr.head_table(stacked(parts)) for name, parts in spectra.items() if parts}
  ident = tables["identity"]
  res: dict[str, Any] = {"d": d, "note": "W = sym(W_QK) Sigma on RMS-normalised states (norm gain folded in), "
                         "RoPE ignored; Sigma = identity, or step_covariance: the covariance of x_{t+1} - x_t "
                         "over consecutive layer inputs of each caption's sequence (Assumption 1's random-walk "
                         "step); rho by the corrected eq. (7) (see air_jax.analysis.propagation)"}
  for name, tab in tables.items():
    res[name] = {k: v.tolist() for k, v in tab.items() if k not in ("rho", "theta")}
  w_shape = (nl, cfg.num_attention_heads)
  groups = {}
  mask = np.zeros(w_shape, bool)
  for l, h in hal:
    mask[l, h] = True
  nmask = np.zeros_like(mask)
  for l, h in non:
    nmask[l, h] = True
  for sig, tab in tables.items():
    g = {}
    for name, sel in (("sensitive", mask), ("insensitive", nmask), ("all", np.ones_like(mask))):
      if sel.any():
        g[name] = {k: float(np.nanmean(tab[k][sel])) for k in ("tr_w", "tr_w2", "xi", "eta", "rho_peak",
                                                              "rho_peak_theta")}
        g[name]["interior_peak_share"] = float(np.isfinite(tab["theta_star"][sel]).mean())
    groups[sig] = g
  res["groups"] = groups
  # Monte Carlo check of eq. (1) on the first sensitive and first insensitive head (identity Sigma).
  checks = {}
  picks = [("sensitive", hal[0])] if hal else []
  picks += [("insensitive", non[0])] if non else [("head 0,0", (0, 0))]
  t = args.mc_tokens
  theta = np.arange(1, t + 1) / t
  mc_points = {}
  for name, (l, h) in picks:
    head_factors = (factors[l][0][h], factors[l][1][h])
    sp = pr.spectrum_from_factors(*head_factors, d)
    mc = pr.rho_monte_carlo(head_factors, t, d, num_draws=args.mc_draws, seed=0)
    corr = pr.rho_closed_form(theta, sp.tr_w, sp.tr_w2, d, "corrected")
    paper = pr.rho_closed_form(theta, sp.tr_w, sp.tr_w2, d, "paper")
    fin = pr.rho_finite(t, sp.tr_w, sp.tr_w2, d)
    checks[f"{name} ({l},{h})"] = {
        "tr_w": float(sp.tr_w), "tr_w2": float(sp.tr_w2), "T": t, "draws": args.mc_draws,
        "mean_abs_err_corrected": float(np.abs(corr - mc).mean()), "max_abs_err_corrected": float(np.abs(corr - mc).max()),
        "mean_abs_err_paper": float(np.abs(paper - mc).mean()), "max_abs_err_paper": float(np.abs(paper - mc).max()),
        "mean_abs_err_finite": float(np.abs(fin - mc).mean())}
    mc_points[f"Monte Carlo ({l},{h})"] = (theta[::2], mc[::2])
  res["monte_carlo"] = checks
  curves = {}
  for name, sel in (("sensitive heads (mean)", mask), ("insensitive heads (mean)", nmask)):
    if sel.any():
      curves[name] = ident["rho"][sel].mean(0)
  for name, (l, h) in picks:
    curves[f"eq. 7 ({l},{h})"] = ident["rho"][l, h]
  fin_curves = {}
  for name, (l, h) in picks:
    sp = pr.spectrum_from_factors(factors[l][0][h], factors[l][1][h], d)
    fin_curves[f"finite-T eq. 2 ({l},{h}), T={t}"] = pr.rho_finite(t, sp.tr_w, sp.tr_w2, d)
  f = fig.rho_figure(ident["theta"], curves, mc=mc_points, extra=(theta, fin_curves),
                     title="token propagation probability (corrected eq. 7, Sigma = I)")
  fig.save(f, out_dir / "propagation.png")
  return res


def parse_grid(text: str | None) -> dict[str, tuple[float, ...]]:
  """--sweep-grid JSON {knob: [values]} (default: sensitivity.DEFAULT_GRID), checked."""
  from air_jax.analysis import sensitivity

  if not text:
    return dict(sensitivity.DEFAULT_GRID)
  try:
    grid = json.loads(text)
    if not isinstance(grid, dict):
      raise TypeError("not an object")
    grid = {str(k): tuple(float(v) for v in vals) for k, vals in grid.items()}
  except (json.JSONDecodeError, TypeError, ValueError) as e:
    raise AnalyzeError(f"--sweep-grid {text!r}: expected JSON {{knob: [numbers]}} ({e})") from e
  bad = [k for k in grid if k not in sensitivity.KNOBS]
  if bad:
    raise AnalyzeError(f"--sweep-grid: unknown knob(s) {bad}; expected {sorted(sensitivity.KNOBS)}")
  empty = [k for k, v in grid.items() if not v]
  if empty:
    raise AnalyzeError(f"--sweep-grid: no values for {empty}")
  return grid


def sweeps_section(model, split, hal, args, out_dir, fig, analysed: Sequence = ()) -> dict:
  """C.2 sweeps on `args.sweep_images` held-out images other than the `analysed` ones."""
  from air_jax import AIRConfig
  from air_jax.analysis import sensitivity
  from air_jax.atomic import atomic_write_json

  overrides = {}
  if args.air_config:
    try:
      overrides = json.loads(Path(args.air_config).read_text()).get("air", {})
    except (json.JSONDecodeError, AttributeError) as e:
      raise AnalyzeError(f"--air-config {args.air_config}: expected JSON {{'air': {{field: value}}}} ({e})") from e
  if not hal:
    raise AnalyzeError("the sweeps need sensitive heads: give --heads (or --skip sweeps)")
  try:
    base = AIRConfig.preset("air", heads=hal, **overrides)
  except (TypeError, ValueError) as e:
    raise AnalyzeError(f"--air-config {args.air_config}: {e}") from e
  grid = parse_grid(args.sweep_grid)
  ids = split.sample(args.sweep_images, args.seed + 1, exclude=analysed)  # other scenes than the analysed ones
  images = split.load(ids)

  def score(texts):
    return split.score(ids, texts)["overall_metrics"]

  # Resumable: one knob at a time, kept when its settings match.
  cache_path = out_dir / "sweeps.json"
  key = {"model": str(args.model), "images": [str(i) for i in ids], "base": overrides, "heads": hal,
         "max_new_tokens": args.max_new_tokens, "prompt": args.prompt}
  cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
  if cache.get("key") != json.loads(json.dumps(key)):
    cache = {"key": key, "curves": {}}
  greedy = None
  for knob, values in grid.items():
    if knob in cache["curves"] and cache["curves"][knob]["values"] == [float(v) for v in values]:
      continue
    if greedy is None:
      from air_jax.generate import generate

      greedy = []
      for s in range(0, len(images), args.batch_size):
        greedy += generate(model, None, images[s:s + args.batch_size], args.prompt,
                           max_new_tokens=args.max_new_tokens).texts
    t0 = time.time()
    cache["curves"][knob] = sensitivity.run_sweeps(model, base, images, args.prompt, score, grid={knob: values},
                                                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                                   greedy_texts=greedy)[knob]
    log.info("sweep %s (%d configs x %d images): %.1f s", knob, len(values), len(images), time.time() - t0)
    atomic_write_json(cache_path, cache, indent=1)
  curves = {k: cache["curves"][k] for k in grid}
  defaults = {k: getattr(base, f) for k, f in sensitivity.KNOBS.items()}
  f = fig.sensitivity_figure(curves, defaults=defaults,
                             title=f"AIR sensitivity on {len(ids)} held-out images (CHAIR, lower is better)")
  fig.save(f, out_dir / "sensitivity.png")
  return {"num_images": len(ids), "base": {k: defaults[k] for k in defaults}, "curves": curves}


@releases_output_locks
def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = build_parser().parse_args(argv)
  out_dir = Path(args.out)
  check_output_dir(out_dir)  # before any work; also keeps a second run off this directory
  apply_defaults(args)
  skip = set(args.skip)

  import air_jax
  from air_jax.analysis import attention_stats as bs, base_llm, figures as fig, imbalance, model_io, \
    similarity
  from air_jax.atomic import atomic_write_json
  from air_jax.generate import generate_inputs

  result: dict[str, Any] = {"config": {k: v for k, v in vars(args).items()}}
  methods = None
  if "cost" not in skip and args.methods_json:
    try:
      methods = air_jax.analysis.read_methods_json(args.methods_json)
    except ValueError as e:
      raise AnalyzeError(str(e)) from e
  try:
    model = air_jax.load_pretrained(args.model)
  except (ValueError, FileNotFoundError) as e:
    raise AnalyzeError(f"--model {args.model}: {e}") from e
  cfg = model_io.text_config(model)
  nl, nh = cfg.num_hidden_layers, cfg.num_attention_heads
  hal, non = _heads(args, nl, nh)
  if "propagation" not in skip:
    try:  # B.1 needs W_QK factors: decoders whose scores are not bilinear (q/k norms or biases, MLA) have none
      model_io.qk_factors(model, 0)
    except ValueError as e:
      skip.add("propagation")
      result["propagation"] = {"skipped": str(e)}
      print(f"note: B.1 (propagation) skipped: {e}", file=sys.stderr)
  if "sweeps" not in skip and not hal:  # before the hours of the other sections, not after them
    raise AnalyzeError("the sweeps need sensitive heads: give --heads (or --skip sweeps)")
  sens = imbalance.head_mask(hal, nl, nh)
  try:
    split = Split(args)
  except Exception as e:  # annotation / vocabulary problems are the user's files
    raise AnalyzeError(f"--coco-root {args.coco_root} / --synonyms: {e}") from e
  base = model
  if args.base_llm != "self":
    try:
      base = base_llm.load_base_llm(args.base_llm)
    except (ValueError, FileNotFoundError) as e:
      raise AnalyzeError(f"--base-llm: {e}") from e
  placeholder = base_placeholder(model, base)

  # Greedy captions with the per-step segment masses (MAI), scored with CHAIR.
  t0 = time.time()
  ids = split.sample(args.num_images, args.seed)
  images = split.load(ids)
  gens = [air_jax.generate(model, None, images[s:s + args.batch_size], args.prompt,
                           max_new_tokens=args.max_new_tokens, output_attention_stats=True)
          for s in range(0, len(images), args.batch_size)]
  texts = [t for g in gens for t in g.texts]
  chair = split.score(ids, texts)
  result["captions"] = {"num_images": len(ids), "CHAIRs": chair["overall_metrics"]["CHAIRs"],
                        "CHAIRi": chair["overall_metrics"]["CHAIRi"], "seconds": round(time.time() - t0, 2)}

  if "mai" not in skip:
    masses = np.concatenate([g.segment_mass for g in gens])
    num = np.concatenate([g.num_tokens for g in gens])
    mai = imbalance.mai(masses, num)
    result["mai"] = imbalance.mai_summary(mai, sens, masses, num,
                                          insensitive=imbalance.head_mask(non, nl, nh) if non else None)
    live = masses * (np.arange(masses.shape[1])[None, :] < num[:, None])[..., None, None, None]
    result["mai"]["per_head_pooled"] = (live[..., 2].sum((0, 1)) / np.maximum(live[..., 1].sum((0, 1)), 1e-9)).tolist()
    fig.save(fig.mai_figure(masses, num, sens, title=f"MAI, {len(ids)} greedy captions"), out_dir / "mai.png")

  # Teacher-forced passes: A.2, B.2, TAI, and the step covariance (Sigma) of B.1.
  from air_jax.analysis.propagation import StepCovariance

  sims, floors, var_rows, ent_rows, per_caption = [], [], [], [], []
  steps = StepCovariance() if args.sigma == "both" and "propagation" not in skip else None
  tai_dist, base_dist = {"value_norm": [], "uniform": []}, []
  need_pass = bool({"similarity", "variance", "tai", "propagation"} - skip)
  grid_done = False
  k = 0
  for g in gens if need_pass else ():
    for b in range(len(g.texts)):
      image_id, sentence = ids[k], chair["sentences"][k]
      k += 1
      cap = caption_ids(model, g, b)
      if len(cap) < 2:
        continue
      p_ids, _, pixels = generate_inputs(model, images[k - 1], args.prompt, bucket=0)
      p_ids = p_ids[0]
      out = attention_pass(model, base, placeholder, p_ids, pixels, cap)
      attn, p_len, s = out["attn"], len(p_ids), len(out["seq"])
      sims.append(similarity.head_similarity(attn, out["llm_attn"], len(cap)))
      floors.append(similarity.cosine(similarity.output_block(attn, len(cap)),
                                      similarity.uniform_causal_block(len(cap), len(out["seq"]))))
      rows_attn, valid = bs.generating_rows(attn, p_len, s)
      var_rows.append(bs.row_variance(rows_attn, valid))
      ent_rows.append(bs.row_entropy(rows_attn, valid))
      if steps is not None:  # steps within this caption's sequence only, per layer
        steps.update(out["states"])
      rows = np.arange(p_len - 1, s - 1)
      cand = np.arange(p_len, s - 1)
      hal_pos = [p_len + i for i in hallucinated_positions(model, sentence, cap)]
      tok = model.processor.tokenizer
      entry = {"image_id": image_id, "caption": sentence["caption"],
               "hallucinated": sentence["mscoco_hallucinated_words"],
               "hallucinated_token_positions": [int(p - p_len) for p in hal_pos]}
      sel = sens if args.tai_heads == "sensitive" and sens.any() else np.ones_like(sens)
      for info, norms in (("value_norm", out["value_norms"][sel]), ("uniform", None)):
        t = imbalance.tai(attn[sel], rows, norms)
        high = imbalance.high_tai_tokens(t["tai"], t["attention_share"], t["uniform_share"], cand,
                                         args.tai_threshold, args.tai_top_k)
        dist = imbalance.distance_to_next(high, hal_pos)
        tai_dist[info] += dist
        entry[f"high_tai_{info}"] = [
            {"position": int(j - p_len), "token": tok.convert_ids_to_tokens(int(out["seq"][j])),
             "tai": float(t["tai"][j]), "distance_to_next_hallucination": d} for j, d in zip(high, dist)]
        entry[f"prompt_top_tai_{info}"] = [
            {"position": int(j), "token": tok.convert_ids_to_tokens(int(out["seq"][j])), "tai": float(t["tai"][j])}
            for j in imbalance.high_tai_tokens(t["tai"], t["attention_share"], t["uniform_share"], np.arange(p_len),
                                               None, 3)]
      base_dist += imbalance.distance_to_next(cand, hal_pos)
      per_caption.append(entry)
      if not grid_done and len(per_caption) > args.grid_caption:
        layers = _grid_choice(args.grid_layers, nl, 4)
        heads = _grid_choice(args.grid_heads, nh, 8)
        seg = np.asarray(p_ids) == model.config.image_token_id
        bounds = {"caption": p_len}
        if seg.any():
          bounds.update(image=int(np.argmax(seg)), text=int(len(seg) - np.argmax(seg[::-1])))
        title = (f"attention of caption {args.grid_caption} (\"{sentence['caption'][:60]}...\"), sqrt scale; "
                 "dotted: image / text / caption start")
        f = fig.attention_grid(attn, layers, heads, boundaries=bounds, title=title)
        fig.save(f, out_dir / "attention_grid.png", dpi=70)
        grid_done = True

  if sims and "similarity" not in skip:
    sim = np.stack(sims)
    result["similarity"] = {**similarity.group_means(sim, hal, non), "base_llm": args.base_llm,
                            "chance_floor": {"note": "cosine of the LVLM's maps with uniform causal attention",
                                             **similarity.group_means(np.stack(floors), hal, non)},
                            "per_head": np.nanmean(sim, 0).tolist(), "num_captions": len(sims)}
    f = fig.head_heatmap(np.nanmean(sim, 0), title=f"A.2 cosine(LVLM, base LLM) on output tokens, {len(sims)} "
                         f"captions (S: sensitive, N: insensitive)", label="cosine similarity",
                         hal_heads=hal, non_hal_heads=non, vmin=0.0, vmax=1.0)
    fig.save(f, out_dir / "similarity.png")
  if var_rows and "variance" not in skip:
    v_head = np.stack([v.mean(-1) for v in var_rows]).mean(0)
    h_head = np.stack([h.mean(-1) for h in ent_rows]).mean(0)
    corr = bs.variance_entropy_correlation(np.concatenate([v.ravel() for v in var_rows]),
                                           np.concatenate([h.ravel() for h in ent_rows]))
    groups = {}
    for name, sel in (("sensitive", sens), ("insensitive", imbalance.head_mask(non, nl, nh))):
      if sel.any():
        groups[name] = {"variance": float(v_head[sel].mean()), "entropy": float(h_head[sel].mean())}
    result["variance"] = {"correlation_rows": corr, "correlation_heads": bs.variance_entropy_correlation(v_head, h_head),
                          "groups": groups, "variance_per_head": v_head.tolist(), "entropy_per_head": h_head.tolist()}
    fig.save(fig.variance_entropy_figure(v_head, h_head, sens), out_dir / "variance_entropy.png")
  if per_caption and "tai" not in skip:
    result["tai"] = {
        "definition": "TAI_j = attention share / information share; value_norm: information = attention-weighted "
                      "value norms ||W_O^h v_j||, uniform: 1 / visible keys (air_jax.analysis.imbalance)",
        "top_k": args.tai_top_k, "threshold": args.tai_threshold, "window": args.tai_window,
        "heads": args.tai_heads if hal else "all",
        "within_window_share_all_tokens": imbalance.within_fraction(base_dist, args.tai_window)}
    for info, dist in tai_dist.items():
      with_d = [d for d in dist if d is not None]
      result["tai"][info] = {"num_high_tai_tokens": len(dist),
                             "within_window_share": imbalance.within_fraction(dist, args.tai_window),
                             "median_distance": float(np.median(with_d)) if with_d else None}
    result["tai"]["captions"] = per_caption
  if "propagation" not in skip:
    result["propagation"] = propagation_section(model, steps, hal, non, args, out_dir, fig)
  if "heatmap" not in skip and args.attribution:
    z = np.load(args.attribution)
    key = "prob_E" if "prob_E" in z.files else "E"
    f = fig.head_heatmap(z[key], title=f"E_h ({key}) of {Path(args.attribution).name} (S: sensitive, N: insensitive)",
                         label="effect size E_h", hal_heads=hal, non_hal_heads=non)
    fig.save(f, out_dir / "heads_E.png")
    result["heatmap"] = {"source": args.attribution, "key": key}
  if methods is not None:
    fig.save(fig.cost_figure(methods["methods"], model=methods["model"]), out_dir / "cost.png")
    result["cost"] = methods
  if "sweeps" not in skip:
    result["sweeps"] = sweeps_section(model, split, hal, args, out_dir, fig, analysed=ids)
  atomic_write_json(out_dir / "analysis.json", _jsonable(result), indent=1)
  return result


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.floating, float)):
    return None if not np.isfinite(x) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def _num(x, spec: str = ".3f", scale: float = 1.0) -> str:
  """`x * scale` formatted by `spec`, or "n/a" for a missing value (NaN becomes None in `_jsonable`: an empty head
  group, no high-TAI token, ...)."""
  if x is None or not np.isfinite(x):
    return "n/a"
  return format(scale * x, spec)


def summary_lines(result: dict) -> list[str]:
  """The printed summary of a `_jsonable` result; values of empty groups read "n/a"."""
  c = result["captions"]
  lines = [f"captions: {c['num_images']}, C_S {_num(c['CHAIRs'], '.1f', 100)}, C_I {_num(c['CHAIRi'], '.1f', 100)}"]
  if "similarity" in result:
    s = result["similarity"]
    lines.append(f"A.2 similarity: S_hal {_num(s['S_hal'])}, S_non {_num(s['S_non'])}, all {_num(s['S_all'])} "
                 f"(chance floor, uniform causal attention: {_num(s['chance_floor']['S_all'])})")
  if "mai" in result:
    m = result["mai"]
    lines.append(f"MAI (pooled text/image mass): sensitive heads {_num(m['sensitive_pooled'], '.2f')}, other heads "
                 f"{_num(m['other_pooled'], '.2f')} (medians per head and step {_num(m['sensitive_median'], '.2f')} / "
                 f"{_num(m['other_median'], '.2f')})" + (f"; insensitive heads {_num(m['insensitive_pooled'], '.2f')}"
                                                          if "insensitive_pooled" in m else ""))
  if "variance" in result:
    c = result["variance"]["correlation_rows"]
    lines.append(f"B.2: corr(variance, entropy) over rows: Pearson {_num(c['pearson'])}, "
                 f"Spearman {_num(c['spearman'])}")
  if "tai" in result:
    t = result["tai"]
    for info in ("value_norm", "uniform"):
      lines.append(f"TAI ({info}): {t[info]['num_high_tai_tokens']} high-TAI tokens, "
                   f"{_num(t[info]['within_window_share'], '.0f', 100)}% followed by a hallucination within "
                   f"{t['window']} tokens (any caption token: {_num(t['within_window_share_all_tokens'], '.0f', 100)}%)")
  if "propagation" in result and "skipped" not in result["propagation"]:
    for name, c in result["propagation"]["monte_carlo"].items():
      lines.append(f"B.1 Monte Carlo {name}: mean |err| corrected eq.7 {_num(c['mean_abs_err_corrected'])}, "
                   f"printed eq.7 {_num(c['mean_abs_err_paper'])}, finite-T eq.2 {_num(c['mean_abs_err_finite'])}")
  return lines


def main(argv: Sequence[str] | None = None) -> int:
  from eval.cli import run_cli

  def body() -> int:
    result = run(argv)
    print("\n".join(summary_lines(_jsonable(result))))
    return 0

  return run_cli(body, (AnalyzeError,))


if __name__ == "__main__":
  sys.exit(main())
