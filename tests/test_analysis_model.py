"""air_jax.analysis on models: the base-LLM loader, A.2 self-similarity, layer inputs, W_QK, and the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from air_jax.analysis import model_io, similarity
from air_jax.analysis.base_llm import load_base_llm
from tests.vl_reference import assert_layer_reads

COCO = os.path.join(os.path.dirname(__file__), "fixtures", "coco")
METHODS = os.path.join(os.path.dirname(__file__), "fixtures", "methods_bench.json")


def _save_llama(path, text_config, state=None, lm_head=None, seed=0):
  import torch
  from transformers import LlamaForCausalLM

  torch.manual_seed(seed)
  llm = LlamaForCausalLM(text_config)
  with torch.no_grad():
    if state is not None:
      llm.model.load_state_dict(state)
      llm.lm_head.weight.copy_(lm_head)
    else:
      for name, p in llm.named_parameters():
        if p.ndim >= 2 and "embed" not in name:
          p.normal_(0.0, 0.1)
  llm.eval()
  llm.save_pretrained(path)
  return llm


@pytest.fixture(scope="module")
def llm_dirs(tiny_torch, tmp_path_factory):
  """(dir of the tiny LLaVA's own language model as a LlamaForCausalLM, its torch model, dir of an unrelated one)."""
  own = str(tmp_path_factory.mktemp("own_llm"))
  cfg = tiny_torch.config.text_config
  llm = _save_llama(own, cfg, tiny_torch.model.language_model.state_dict(), tiny_torch.lm_head.weight)
  other = str(tmp_path_factory.mktemp("other_llm"))
  _save_llama(other, cfg, seed=7)
  return own, llm, other


def _sequence(model):
  """Prompt ids with the expanded image run, pixel values, and 10 caption-like token ids."""
  from air_jax.generate import generate_inputs
  from tests.tiny import random_images

  ids, _, pixels = generate_inputs(model, random_images(1, 28)[0], "Please describe this image in detail.", bucket=0)
  cap = np.random.default_rng(0).integers(4, 90, 10).astype(np.int32)
  return np.concatenate([ids[0], cap]), pixels, len(cap)


def test_base_llm_loader_matches_transformers(llm_dirs):
  import torch

  own, llm, _ = llm_dirs
  base = load_base_llm(own)
  ids = np.random.default_rng(1).integers(0, 90, (1, 12)).astype(np.int32)
  from models.llava import forward

  ours = forward(base.params, base.config, ids, None, output_attentions=True)
  with torch.no_grad():
    ref = llm(torch.tensor(ids, dtype=torch.long), output_attentions=True)
  np.testing.assert_allclose(np.asarray(ours["logits"]), ref.logits.numpy(), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(model_io.decoder_attentions(base, ids)[:, 0], np.stack([a[0].numpy() for a in ref.attentions]),
                             atol=1e-5)


def test_base_llm_loader_errors(tmp_path, llm_dirs):
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_base_llm(str(tmp_path))
  import shutil

  bad = tmp_path / "bad"
  shutil.copytree(llm_dirs[0], bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["num_hidden_layers"] = 3
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="unfilled parameters"):
    load_base_llm(str(bad))


def test_similarity_with_itself_is_one_and_with_unrelated_heads_far_below(tiny_model, llm_dirs):
  from eval.analyze import text_only_ids

  own, _, other = llm_dirs
  seq, pixels, t = _sequence(tiny_model)
  text_seq = text_only_ids(seq, tiny_model.config.image_token_id, [tiny_model.config.image_token_id])
  assert len(text_seq) == len(seq) - tiny_model.config.num_image_tokens + 1
  self_attn = model_io.decoder_attentions(tiny_model, text_seq[None])[:, 0]  # the LVLM's own LM, text only
  same = model_io.decoder_attentions(load_base_llm(own), text_seq[None])[:, 0]
  unrelated = model_io.decoder_attentions(load_base_llm(other), text_seq[None])[:, 0]
  with_image = model_io.decoder_attentions(tiny_model, seq[None], None, pixels)[:, 0]
  from eval.analyze import _bucketed

  padded = model_io.decoder_attentions(tiny_model, *_bucketed(text_seq))[:, 0, :, :len(text_seq), :len(text_seq)]
  np.testing.assert_allclose(padded, self_attn, atol=1e-6)  # right padding leaves the causal rows unchanged
  sim_same = similarity.head_similarity(self_attn, same, t)
  np.testing.assert_allclose(sim_same, 1.0, atol=1e-6)
  sim_other = similarity.head_similarity(self_attn, unrelated, t)
  # Causal maps share their triangle, so even unrelated heads are not orthogonal; they stay well below 1.
  assert sim_other.mean() < 0.8, sim_other
  sim_image = similarity.head_similarity(with_image, self_attn, t)
  assert sim_other.mean() < sim_image.mean() < 1.0


def test_layer_inputs_and_value_norms_match_transformers(tiny_model, tiny_torch):
  import torch

  seq, pixels, _ = _sequence(tiny_model)
  states, norms = model_io.layer_inputs(tiny_model, seq[None], None, pixels)
  with torch.no_grad():
    ref = tiny_torch(input_ids=torch.tensor(seq[None], dtype=torch.long), pixel_values=torch.tensor(pixels),
                     output_hidden_states=True)
  assert_layer_reads(states, norms, ref.hidden_states, tiny_torch.model.language_model,
                     tiny_torch.config.text_config)


def test_qk_matrices_give_the_pre_rope_logits(tiny_model):
  cfg = tiny_model.config.text
  w = model_io.qk_matrices(tiny_model)
  assert w.shape == (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size, cfg.hidden_size)
  lm = tiny_model.params["language_model"]["layers"]
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((2, cfg.hidden_size))
  layer, head = 1, 3
  g = np.asarray(lm["input_layernorm"]["weight"][layer], np.float64)
  q = np.asarray(lm["self_attn"]["q_proj"]["weight"][layer], np.float64) @ (g * x)
  k = np.asarray(lm["self_attn"]["k_proj"]["weight"][layer], np.float64) @ (g * y)
  d, group = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
  want = q[head * d:(head + 1) * d] @ k[(head // group) * d:(head // group + 1) * d]
  assert x @ w[layer, head] @ y == pytest.approx(want, rel=1e-9)
  fa, fb = model_io.qk_factors(tiny_model, layer)
  np.testing.assert_allclose(np.einsum("hde,hdf->hef", fa, fb), w[layer], rtol=1e-12, atol=1e-14)


def test_analyze_cli_on_a_tiny_model(tiny_dir, llm_dirs, tmp_path, monkeypatch, capsys):
  from eval import analyze

  heads = tmp_path / "heads.json"
  heads.write_text(json.dumps({"hal_heads": [[0, 1], [1, 2]], "non_hal_heads": [[0, 0], [1, 3]]}))
  out = tmp_path / "out"
  argv = ["--model", tiny_dir, "--coco-root", COCO, "--num-images", "3", "--max-new-tokens", "8",
          "--heads", str(heads), "--base-llm", llm_dirs[0], "--methods-json", METHODS, "--sweep-images", "2",
          "--sweep-grid", json.dumps({"lambda": [1.0, 3.5], "beta": [0.0, 0.3]}), "--batch-size", "3",
          "--mc-draws", "200", "--mc-tokens", "16", "--out", str(out)]
  assert analyze.main(argv) == 0
  for name in ("analysis.json", "attention_grid.png", "mai.png", "similarity.png", "propagation.png",
               "variance_entropy.png", "sensitivity.png", "cost.png", "sweeps.json"):
    assert (out / name).stat().st_size > 0, name
  res = json.loads((out / "analysis.json").read_text())
  assert set(res) >= {"captions", "mai", "similarity", "variance", "tai", "propagation", "cost", "sweeps"}
  assert res["similarity"]["base_llm"] == llm_dirs[0] and np.array(res["similarity"]["per_head"]).shape == (2, 4)
  assert res["sweeps"]["curves"]["lambda"]["values"] == [1.0, 3.5] and len(res["sweeps"]["curves"]["beta"]["C_S"]) == 2
  assert np.array(res["propagation"]["identity"]["tr_w"]).shape == (2, 4)
  # Sigma of Assumption 1 = covariance of the steps between consecutive layer inputs (not of the states)
  assert np.array(res["propagation"]["step_covariance"]["tr_w"]).shape == (2, 4)
  assert "state_covariance" not in res["propagation"]
  assert "A.2 similarity" in capsys.readouterr().out
  analysed = {str(c["image_id"]) for c in res["tai"]["captions"]}
  assert analysed and not analysed & set(json.loads((out / "sweeps.json").read_text())["key"]["images"])
  # The sweeps resume from sweeps.json: a rerun generates no sweep.
  import sys

  def boom(*a, **k):
    raise AssertionError("sweep rerun")

  monkeypatch.setattr(sys.modules["air_jax.generate"], "generate_sweep", boom)
  assert analyze.main(argv + ["--skip", "similarity", "--skip", "propagation", "--tai-heads", "sensitive"]) == 0
  assert json.loads((out / "analysis.json").read_text())["tai"]["heads"] == "sensitive"


def test_analyze_cli_with_an_empty_head_group_prints_na(tiny_dir, tmp_path, capsys):
  """No sensitive heads: S_hal and the sensitive MAI are NaN (None in the JSON); the summary says n/a, exit 0."""
  from eval import analyze

  heads = tmp_path / "heads.json"
  heads.write_text(json.dumps({"hal_heads": [], "non_hal_heads": [[0, 0]]}))
  out = tmp_path / "out"
  argv = ["--model", tiny_dir, "--coco-root", COCO, "--num-images", "1", "--max-new-tokens", "6", "--heads",
          str(heads), "--skip", "sweeps", "--skip", "propagation", "--skip", "cost", "--out", str(out)]
  assert analyze.main(argv) == 0
  res = json.loads((out / "analysis.json").read_text())
  printed = capsys.readouterr().out
  if "similarity" in res:  # needs a caption of at least 2 tokens
    assert res["similarity"]["S_hal"] is None and "S_hal n/a" in printed
  assert res["mai"]["sensitive_pooled"] is None and "sensitive heads n/a" in printed


def test_sweeps_without_heads_fail_before_the_other_sections(tiny_dir, tmp_path, capsys):
  from eval import analyze

  out = tmp_path / "out"
  argv = ["--model", tiny_dir, "--coco-root", COCO, "--num-images", "1", "--max-new-tokens", "2", "--out", str(out)]
  assert analyze.main(argv) != 0
  assert "the sweeps need sensitive heads" in capsys.readouterr().err
  assert not (out / "analysis.json").exists()  # nothing ran


def test_summary_lines_of_empty_groups():
  from eval import analyze

  nan = float("nan")
  result = {"captions": {"num_images": 2, "CHAIRs": 0.5, "CHAIRi": 0.25},
            "similarity": {"S_hal": nan, "S_non": 0.5, "S_all": 0.6, "chance_floor": {"S_all": 0.3}},
            "mai": {"sensitive_pooled": nan, "other_pooled": 0.7, "sensitive_median": nan, "other_median": 0.6,
                    "insensitive_pooled": nan},
            "variance": {"correlation_rows": {"pearson": nan, "spearman": -0.9}},
            "tai": {"window": 15, "within_window_share_all_tokens": nan,
                    **{k: {"num_high_tai_tokens": 0, "within_window_share": nan} for k in ("value_norm", "uniform")}},
            "propagation": {"monte_carlo": {"head 0,0 (0,0)": {"mean_abs_err_corrected": 0.01,
                                                                 "mean_abs_err_paper": nan,
                                                                 "mean_abs_err_finite": 0.02}}}}
  lines = analyze.summary_lines(analyze._jsonable(result))
  text = "\n".join(lines)
  assert "S_hal n/a, S_non 0.500" in text and "sensitive heads n/a, other heads 0.70" in text
  assert "insensitive heads n/a" in text and "Pearson n/a" in text and "printed eq.7 n/a" in text
  assert "C_S 50.0, C_I 25.0" in lines[0] and "n/a% followed" in text


def test_sweep_images_are_other_scenes_than_the_analysed(tiny_dir, tmp_path):
  from eval import analyze

  args = analyze.build_parser().parse_args(["--model", tiny_dir, "--coco-root", COCO, "--out", str(tmp_path)])
  analyze.apply_defaults(args)
  split = analyze.Split(args)
  analysed = split.sample(24, 42)  # the defaults of --num-images and --seed on the 80-image fixture
  assert set(split.sample(24, 43)) & set(analysed)  # seed + 1 alone overlaps: what the exclusion prevents
  sweep = split.sample(100, 43, exclude=analysed)
  assert len(sweep) == 80 - 24 and not set(sweep) & set(analysed)
  assert split.sample(10, 43, exclude=analysed) == split.sample(10, 43, exclude=analysed)  # deterministic
  with pytest.raises(analyze.AnalyzeError, match="80.*left after excluding the 80 analysed"):
    split.sample(5, 43, exclude=split.sample(80, 42))


def test_analyze_cli_errors(tiny_dir, tmp_path, capsys):
  from eval import analyze

  assert analyze.main(["--model", tiny_dir, "--coco-root", COCO, "--base-llm", str(tmp_path / "nope"),
                       "--out", str(tmp_path)]) == 2
  assert "--base-llm" in capsys.readouterr().err
  assert analyze.main(["--model", tiny_dir, "--out", str(tmp_path)]) == 2
  assert "both --model and --coco-root" in capsys.readouterr().err
  assert analyze.main(["--model", tiny_dir, "--coco-root", COCO, "--skip", "everything", "--out", str(tmp_path)]) == 2
  bad = tmp_path / "heads.json"
  bad.write_text('{"hal": []}')
  assert analyze.main(["--model", tiny_dir, "--coco-root", COCO, "--heads", str(bad), "--out", str(tmp_path)]) == 2
  assert "--heads" in capsys.readouterr().err
  with pytest.raises(analyze.AnalyzeError, match="unknown knob"):
    analyze.parse_grid('{"alpha": [1]}')
  with pytest.raises(analyze.AnalyzeError, match="numbers"):
    analyze.parse_grid('{"beta": "x"}')
  assert analyze.parse_grid('{"beta": [0, 0.5]}') == {"beta": (0.0, 0.5)}
