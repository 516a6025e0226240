"""Head attribution CLI (AIR, A.1): Delta P of every attention head at CHAIR object tokens -> S_h, E_h, heads.

  python -m eval.attribute --chair-json results/greedy_chair.json --coco-root DIR --model DIR --out DIR \
      [--semantics current_token|full_sequence] [--score prob|abs|logprob] [--top-k 20] [--chunk 256]

Input: a CHAIR result written by ``eval.chair`` (its ``sentences``: image_id, caption, hallucinated and correct
object words with their word indices). As the official tool, only captions with a hallucination
(``CHAIRs == 1``) are used unless ``--all-captions``. Images: ``<coco-root>/<split>/<file_name>``. With
``--generate`` the captions are produced again (greedy, ``air_jax.generate``) and CHAIR-scored on the fly.

Every sample is saved as it finishes: a line in ``attribution_records.jsonl`` (the scored tokens and how each
was located) and the aggregator state ``attribution_state.npz`` (written atomically; it lists the processed
image ids), so a crash loses nothing and a rerun resumes. At the end (atomically):
  heads_S.json / heads_E.json   official heads format {"hal_heads", "non_hal_heads"}, ranked by S_h (the
                                official tool) / E_h (the paper); non_hal = most negative (see --non-hal)
  attribution.npz               S, E, count_H/N, mean_H/N, var_H/N for --score, and <score>_* for all scores
  heatmap_S.png, heatmap_E.png  layers x heads
  summary.json                  configuration, counts, top heads with their values
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from air_jax.atomic import atomic_write
from eval.captions_io import append_record, iter_jsonl, repair_tail
from eval.cli import releases_output_locks
from eval.coco import AnnotationError, CocoImages, atomic_write_json, match_image_id

log = logging.getLogger("eval.attribute")

SCORES = ("prob", "abs", "logprob")
STATE = "attribution_state.npz"
RECORDS = "attribution_records.jsonl"
# Settings a resumed run must share with the run that wrote the state.
RESUME_KEYS = ("chair_json", "model", "semantics", "match", "prompt", "all_captions", "generate", "split", "screen",
               "max_new_tokens", "dtype", "chair_json_sha256")


class AttributionError(RuntimeError):
  """A user-facing error: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m eval.attribute", description=__doc__.splitlines()[0])
  p.add_argument("--chair-json", required=True, help="CHAIR result JSON written by eval.chair")
  p.add_argument("--coco-root", required=True, help="COCO-style root (annotations/, <split>/)")
  p.add_argument("--split", default="val2014")
  p.add_argument("--model", required=True,
                 help="checkpoint directory or Hugging Face repository id (org/name[@revision])")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--semantics", choices=("current_token", "full_sequence"), default="current_token")
  p.add_argument("--score", choices=SCORES, default="prob", help="Delta P used for the heads files")
  p.add_argument("--top-k", type=int, default=20)
  p.add_argument("--chunk", type=int, default=None,
                 help="ablations per vectorised call (bounds memory; default 256 current_token, 16 full_sequence)")
  p.add_argument("--limit", type=int, default=None, help="attribute at most N captions")
  p.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default=None)
  p.add_argument("--match", choices=("span", "token"), default="span",
                 help="span: each mention's first sub-token; token: the official rule (any token equal to a "
                      "mention's first sub-token)")
  p.add_argument("--non-hal", choices=("negative", "abs"), default="negative",
                 help="non_hal_heads: most negative score (official) or smallest |score|")
  p.add_argument("--all-captions", action="store_true", help="also captions without hallucination")
  p.add_argument("--prompt", default=None, help="instruction (default: the CHAIR JSON's, else LLaVA's)")
  p.add_argument("--generate", action="store_true", help="re-generate the captions (greedy) and CHAIR them")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--synonyms", help="CHAIR vocabulary file for --generate (default: COCO)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--screen", type=int, default=None, metavar="K",
                 help="gradient screen first (a backward pass per scored token estimates Delta P of every head), then "
                      "exact ablation of the K heads with the largest |estimated S_h| only; the others are NaN "
                      "in the exact results and never selected (K >= 2 * --top-k fills both heads lists)")
  p.add_argument("--compile-cache", metavar="DIR",
                 help="JAX persistent compilation cache: repeated runs load compiled graphs from DIR")
  p.add_argument("--no-progress", action="store_true")
  return p


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
  atomic_write(path, lambda f: np.savez(f, **arrays), binary=True)


class RunState:
  """Aggregators for every score, the processed ids, and the run's settings; saved atomically as one npz."""

  def __init__(self, num_layers: int, num_heads: int, settings: dict[str, Any]):
    from air_jax.attribution_stats import HeadStats

    self.stats = {s: HeadStats.zeros(num_layers, num_heads) for s in SCORES}
    self.screen_stats = {s: HeadStats.zeros(num_layers, num_heads) for s in SCORES}
    self.done: list[str] = []
    self.screen_done: list[str] = []
    self.screen_heads: list[int] | None = None  # flat ids chosen by the screen (phase 2 ablates these)
    self.settings = settings

  def save(self, path: Path) -> None:
    arrays = {"done": np.array(json.dumps(self.done)), "settings": np.array(json.dumps(self.settings)),
              "screen_done": np.array(json.dumps(self.screen_done)),
              "screen_heads": np.array(json.dumps(self.screen_heads))}
    for score, st in self.stats.items():
      arrays.update(st.to_arrays(f"{score}/"))
    for score, st in self.screen_stats.items():
      arrays.update(st.to_arrays(f"screen_{score}/"))
    _atomic_savez(path, arrays)

  def load(self, path: Path) -> None:
    from air_jax.attribution_stats import HeadStats

    with np.load(path, allow_pickle=False) as z:
      saved = json.loads(str(z["settings"]))
      saved.setdefault("dtype", "float32")  # states written before these were recorded
      saved.setdefault("chair_json_sha256", self.settings.get("chair_json_sha256"))
      for key in RESUME_KEYS:
        if saved.get(key) != self.settings.get(key):
          raise AttributionError(f"{path} was written with {key}={saved.get(key)!r} but this run asks "
                                f"{key}={self.settings.get(key)!r}; use another --out or remove the file")
      for score in SCORES:
        st = HeadStats.from_arrays(z, f"{score}/")
        if st.shape != self.stats[score].shape:
          raise AttributionError(f"{path} holds statistics of shape {st.shape}, the model has "
                                f"{self.stats[score].shape} (layers, heads)")
        self.stats[score] = st
        if f"screen_{score}/count" in z:
          self.screen_stats[score] = HeadStats.from_arrays(z, f"screen_{score}/")
      self.done = json.loads(str(z["done"]))
      if "screen_done" in z:
        self.screen_done = json.loads(str(z["screen_done"]))
        self.screen_heads = json.loads(str(z["screen_heads"]))


def _sync_records(path: Path, done: set[str]) -> None:
  """Keep one record per processed id (drop a record written after the last state save, and torn lines)."""
  if not path.exists():
    return
  keep, seen, dropped = [], set(), 0
  for _, obj in iter_jsonl(path):
    key = json.dumps(obj.get("image_id"))
    if key in done and key not in seen:
      keep.append(obj)
      seen.add(key)
    else:
      dropped += 1
  if dropped or path.read_bytes().count(b"\n") != len(keep):
    atomic_write(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))
  repair_tail(path)


def _load_sentences(path: Path, all_captions: bool) -> tuple[list[dict], str | None]:
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError) as e:
    raise AttributionError(f"--chair-json {path}: cannot read a JSON object ({e})") from e
  if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
    raise AttributionError(f"--chair-json {path}: expected an eval.chair result with a 'sentences' list")
  out = []
  for n, s in enumerate(data["sentences"]):
    for key in ("image_id", "caption", "mscoco_hallucinated_words"):
      if key not in s:
        raise AttributionError(f"--chair-json {path}: sentences[{n}] lacks {key!r}")
    chairs = s.get("metrics", {}).get("CHAIRs", int(bool(s["mscoco_hallucinated_words"])))
    if all_captions or chairs == 1:
      out.append(s)
  prompt = (data.get("config") or {}).get("prompt")
  return out, prompt


def _load_image(path: Path):
  from PIL import Image

  with Image.open(path) as im:
    return im.convert("RGB")


def write_outputs(out: Path, state: RunState, score: str, top_k: int, non_hal: str) -> dict[str, Any]:
  """heads_S.json, heads_E.json, attribution.npz, heatmaps and summary.json from the aggregated state."""
  from air_jax.air_config import write_heads_file
  from air_jax.attribution_stats import select_heads, summary_arrays
  from air_jax.heatmap import save_heatmap

  arrays = dict(summary_arrays(state.stats[score]))
  for name, st in state.stats.items():
    arrays.update({f"{name}_{k}": v for k, v in summary_arrays(st).items()})
  _atomic_savez(out / "attribution.npz", arrays)
  heads, warnings = {}, []
  n_h, n_n = int(np.nanmax(arrays["count_H"], initial=0)), int(np.nanmax(arrays["count_N"], initial=0))
  if min(n_h, n_n) < 2:  # E_h needs a variance in both sets; S_h a mean in both
    warnings.append(f"only {n_h} hallucinated and {n_n} correct object tokens were scored: E_h needs at least 2 "
                    "of each (its heads file is empty or short); score more captions")
  for key in ("S", "E"):
    sel = select_heads(arrays[key], top_k, non_hal)
    if len(sel["hal_heads"]) < top_k:
      warnings.append(f"heads_{key}.json lists {len(sel['hal_heads'])} hallucination heads of the {top_k} asked "
                      f"({key}_h is undefined for the other heads)")
    if len(sel["hal_heads"]) == top_k and len(sel["non_hal_heads"]) < top_k:
      warnings.append(f"heads_{key}.json lists {len(sel['non_hal_heads'])} non-hallucination heads of the {top_k} "
                      f"asked: only {len(sel['hal_heads']) + len(sel['non_hal_heads'])} heads have {key}_h "
                      "(with --screen K, K >= 2 * --top-k gives both lists in full)")
    write_heads_file(out / f"heads_{key}.json", sel["hal_heads"], sel["non_hal_heads"])
    save_heatmap(out / f"heatmap_{key}.png", arrays[key], f"{key}_h ({score}); black: hal, green: non-hal",
                 hal_heads=sel["hal_heads"], non_hal_heads=sel["non_hal_heads"])
    heads[key] = {k: [[l, h, float(arrays[key][l, h])] for l, h in v] for k, v in sel.items()}
  for w in warnings:
    log.warning("%s", w)
  summary = {"config": state.settings, "out": str(out), "score": score, "top_k": top_k, "non_hal": non_hal,
             "num_samples": len(state.done), "num_tokens_H": n_h, "num_tokens_N": n_n, "heads": heads,
             "warnings": warnings}
  if state.screen_heads is not None:
    summary["screen"] = screen_summary(state, score)
    extra = {f"screen_{k}": v for k, v in summary_arrays(state.screen_stats[score]).items()}
    arrays.update(extra)
    _atomic_savez(out / "attribution.npz", arrays)
  atomic_write_json(out / "summary.json", summary, indent=1)
  return summary


def screen_summary(state: RunState, score: str) -> dict[str, Any]:
  """The screened heads and how the estimate ranks them against exact ablation (Spearman over the K heads)."""
  from scipy.stats import spearmanr

  est, exact = state.screen_stats[score].s_score().ravel(), state.stats[score].s_score().ravel()
  ids = np.asarray(state.screen_heads, np.int64)
  ok = ids[~np.isnan(est[ids]) & ~np.isnan(exact[ids])] if ids.size else ids
  rho = float(spearmanr(est[ok], exact[ok])[0]) if ok.size > 2 else None
  nh = state.stats[score].shape[1]
  return {"k": int(ids.size), "num_samples": len(state.screen_done),
          "heads": [[int(i // nh), int(i % nh), float(est[i]), float(exact[i])] for i in ids],
          "spearman_S_estimate_vs_exact": rho}


def _choose_screened(state: RunState, score: str, k: int) -> list[int]:
  """Flat ids of the k heads with the largest |estimated S_h| (NaN never chosen)."""
  from air_jax.attribution_stats import rank_heads

  est = state.screen_stats[score].s_score()
  return [l * est.shape[1] + h for l, h in rank_heads(est, k, largest=True, by_abs=True)]


@releases_output_locks
def run(argv: Sequence[str] | None = None, on_sample: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Runs the attribution; returns the summary. `on_sample(n)` is called after the n-th saved sample (tests)."""
  args = build_parser().parse_args(argv)
  if args.top_k < 1 or (args.chunk is not None and args.chunk < 1):
    raise AttributionError(f"--top-k and --chunk must be >= 1, got {args.top_k} and {args.chunk}")
  if args.screen is not None and args.screen < 1:
    raise AttributionError(f"--screen must be >= 1, got {args.screen}")
  if args.compile_cache:
    from air_jax.compile_cache import enable_compile_cache

    enable_compile_cache(args.compile_cache)  # a ValueError names the directory (exit status 2)
  from eval.cli import check_output_dir, resolve_model_flag

  args.model = resolve_model_flag(args.model)

  check_output_dir(args.out)  # before any work
  chair_path = Path(args.chair_json)
  if args.limit is not None and args.limit < 1:
    raise AttributionError(f"--limit must be at least 1, got {args.limit}")
  sentences, json_prompt = _load_sentences(chair_path, args.all_captions)
  if args.limit is not None:
    sentences = sentences[: args.limit]
  from air_jax.attribution import DEFAULT_PROMPT

  prompt = args.prompt or json_prompt or DEFAULT_PROMPT
  images = CocoImages(args.coco_root, args.split)
  if args.backend is not None:
    from air_jax.backend import BackendError, select_devices

    try:
      select_devices(args.backend)
    except BackendError as e:
      raise AttributionError(f"--backend {args.backend}: {e}") from e
  import air_jax
  from air_jax.attribution import Attributor

  model = air_jax.load_pretrained(args.model, dtype=args.dtype)
  attributor = Attributor(model, semantics=args.semantics, chunk=args.chunk, prompt=prompt, backend=args.backend)
  chair_scorer = _chair_scorer(args) if args.generate else None
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  settings = {"chair_json": str(chair_path.resolve()), "model": str(Path(args.model).resolve()),
              "semantics": args.semantics, "match": args.match, "prompt": prompt,
              "all_captions": args.all_captions, "generate": args.generate, "split": args.split,
              "coco_root": str(args.coco_root), "max_new_tokens": args.max_new_tokens if args.generate else None,
              "screen": args.screen, "dtype": args.dtype,
              # the captions themselves: a file rewritten at the same path must not be merged into a resumed run
              "chair_json_sha256": hashlib.sha256(chair_path.read_bytes()).hexdigest()}
  state = RunState(attributor.num_layers, attributor.num_heads, settings)
  state_path, records_path = out / STATE, out / RECORDS
  if state_path.exists():
    state.load(state_path)
    log.info("%s: resuming, %d captions already attributed", state_path, len(state.done))
  _sync_records(records_path, set(state.done))
  from tqdm import tqdm

  if args.screen is not None and state.screen_heads is None:
    # Phase 1: the gradient screen on every caption (stats only), then the K heads to ablate exactly.
    screened = set(state.screen_done)
    todo = [s for s in sentences if json.dumps(s["image_id"]) not in screened]
    bar = tqdm(total=len(sentences), initial=len(sentences) - len(todo), unit="caption", desc="screen",
               disable=args.no_progress, dynamic_ncols=True)
    try:
      for sentence in todo:
        record = _attribute_one(sentence, images, attributor, chair_scorer, args, screen=True)
        if "result" in record:
          for score, st in state.screen_stats.items():
            record["result"].accumulate(st, score, screen=True)
        state.screen_done.append(json.dumps(sentence["image_id"]))
        state.save(state_path)
        bar.update(1)
    finally:
      bar.close()
    state.screen_heads = _choose_screened(state, args.score, args.screen)
    state.save(state_path)
    log.info("screen: exact ablation of %d heads %s", len(state.screen_heads), state.screen_heads)
  done = set(state.done)
  todo = [s for s in sentences if json.dumps(s["image_id"]) not in done]
  bar = tqdm(total=len(sentences), initial=len(sentences) - len(todo), unit="caption", desc="attribution",
             disable=args.no_progress, dynamic_ncols=True)
  try:
    for n, sentence in enumerate(todo, 1):
      record = _attribute_one(sentence, images, attributor, chair_scorer, args, heads=state.screen_heads)
      for score, st in state.stats.items():
        if "result" in record:
          record["result"].accumulate(st, score)
      result = record.pop("result", None)
      if result is not None:
        record.update(result.record())
      append_record(records_path, record)
      state.done.append(json.dumps(sentence["image_id"]))
      state.save(state_path)
      bar.update(1)
      if on_sample is not None:
        on_sample(n)
  finally:
    bar.close()
  return write_outputs(out, state, args.score, args.top_k, args.non_hal)


def _chair_scorer(args):
  """caption, image id -> CHAIR sentence entry (for --generate)."""
  from eval.chair_metric import Vocabulary, score_caption
  from eval.coco import GroundTruth

  vocab = Vocabulary.from_file(args.synonyms)
  gt = GroundTruth(args.coco_root, args.split, vocab, cache_dir=Path(args.out) / "cache")

  def score(image_id, caption):
    return score_caption(image_id, caption, gt.objects([image_id])[image_id], vocab)
  return score


def _attribute_one(sentence, images: CocoImages, attributor, chair_scorer, args, *, screen: bool = False,
                   heads=None) -> dict[str, Any]:
  raw_id = sentence["image_id"]
  image_id = match_image_id(raw_id, images.file_names)
  record: dict[str, Any] = {"image_id": raw_id}
  if image_id is None:
    log.warning("skipping image id %r: not among the images of %s", raw_id, images.split)
    return {**record, "skipped": f"unknown image id: not among the images of {images.split}"}
  path = images.image_path(image_id)
  try:
    image = _load_image(path)
  except Exception as e:  # noqa: BLE001 -- any decoder failure means "unreadable", the run goes on
    log.warning("skipping image %r: cannot read %s (%s)", raw_id, path, e)
    return {**record, "skipped": f"unreadable image {path}: {type(e).__name__}: {e}"}
  token_ids = None
  if chair_scorer is not None:
    text, token_ids = attributor.generate_caption(image, args.max_new_tokens)
    sentence = chair_scorer(image_id, text)
    if not args.all_captions and not sentence["mscoco_hallucinated_words"]:
      return {**record, "caption": text, "skipped": "regenerated caption has no hallucination"}
  if screen:
    result = attributor.screen(image, sentence, token_ids=token_ids, match=args.match)
  else:
    result = attributor.attribute(image, sentence, token_ids=token_ids, match=args.match, heads=heads)
  if not result.scored:
    return {**record, "caption": result.caption, "skipped": "no object token could be located"}
  return {**record, "result": result}


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns the exit status (2 on a user error)."""
  from eval.cli import run_cli, where_results_are

  def body() -> int:
    summary = run(argv)
    print(f"{summary['num_samples']} captions, {summary['num_tokens_H']} hallucinated and "
          f"{summary['num_tokens_N']} correct object tokens; top heads by S_h: "
          f"{summary['heads']['S']['hal_heads'][:5]}")
    print(where_results_are(summary["out"]))
    return 0

  return run_cli(body, (AttributionError, AnnotationError))


if __name__ == "__main__":
  sys.exit(main())
