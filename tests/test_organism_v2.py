"""Organism v2 (issue 18): data priors and captions, the staged trainer on a tiny config, tuning constraints,
the measurement helpers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from organism import scenes2
from organism.quality import caption_objects, is_malformed, malformed_fraction
from organism.vocab import CLASS_BY_NAME, GROUP_OF, SCENE_BY_NAME


def _break_rate(split: str, n: int) -> float:
  broken = full = 0
  for s in scenes2.scenes2(n, 0, split):
    own = [m for m in SCENE_BY_NAME[s.scene_type].group if m in s.names]
    broken += len(own) == 2
    full += len(own) == 3
  return broken / max(broken + full, 1)


def test_priors_per_split():
  assert _break_rate("text", 4000) < 0.05  # the LM's corpus: groups nearly always complete
  assert 0.08 < _break_rate("train", 3000) < 0.17  # image-caption data: some broken groups
  assert 0.4 < _break_rate("test", 1000) < 0.6  # held-out: half traps
  for split in scenes2.SPLITS2:
    for s in scenes2.scenes2(400, 1, split):
      # out-of-context objects are other scenes' singles, in every split alike (no recognition shift)
      for n in s.unusual:
        assert n not in GROUP_OF and CLASS_BY_NAME[n].scene != s.scene_type
  assert [s.to_dict() for s in scenes2.scenes2(5, 3, "test")] == [s.to_dict() for s in scenes2.scenes2(5, 3, "test")]
  with pytest.raises(ValueError, match="split must be one of"):
    scenes2.scenes2(1, 0, "val")


@pytest.fixture(scope="module")
def tokenizer():
  from organism.train2 import build_tokenizer2

  return build_tokenizer2()


def test_long_captions_name_the_third_member_late(tokenizer):
  lengths, third = [], []
  for s in scenes2.scenes2(600, 2, "train"):
    cap = scenes2.caption2(s)
    assert sorted(caption_objects(cap)) == sorted(s.names) and not is_malformed(cap)
    lengths.append(len(tokenizer.encode(cap, add_special_tokens=False)))
    group = SCENE_BY_NAME[s.scene_type].group
    if all(m in s.names for m in group):
      third.append(scenes2.name_positions(s, tokenizer)[group[-1]])
  assert min(third) >= 30
  assert 40 <= np.median(lengths) <= 80 and max(lengths) <= 80
  s = scenes2.scenes2(1, 0, "test")[0]
  assert tokenizer.decode(tokenizer.encode(scenes2.caption2(s), add_special_tokens=False)) == scenes2.caption2(s)


def test_pope_lists_and_dataset_root(tmp_path):
  from eval.chair_metric import Vocabulary
  from eval.coco import CocoImages, GroundTruth
  from organism.dataset2 import write_dataset2

  write_dataset2(tmp_path, 6, seed=4)
  vocab = Vocabulary.from_file(tmp_path / "synonyms.txt")
  images = CocoImages(str(tmp_path), "test")
  gt = GroundTruth(str(tmp_path), "test", vocab).objects(images.ids)
  pope = json.loads((tmp_path / "annotations" / "pope_test.json").read_text())["images"]
  for p, s, i in zip(pope, scenes2.scenes2(6, 4, "test"), images.ids):
    assert sorted(gt[i]) == sorted(s.names) == sorted(p["present"])
    assert not set(p["present"]) & set(p["absent_random"])
    assert p["absent_adversarial"][:len(s.expected_absent)] == list(s.expected_absent)
    assert sorted(p["absent_popular"]) == sorted(p["absent_random"])


def test_malformed_captions():
  ok = "A photo of a kitchen with a tiled floor, seen from above. There is a fork at the top, red and solid."
  assert not is_malformed(ok)
  assert is_malformed(ok + " There is a fork at the top, red and solid.")  # repeated sentence / object
  assert is_malformed("A photo of a kitchen with a tiled floor, seen from above.")  # no object
  assert is_malformed(ok[:-1] + " and")  # cut off
  assert is_malformed("A kitchen with a fork, a fork and a plate.")  # v1 style loop
  assert malformed_fraction([ok, "nothing"]) == 0.5 and malformed_fraction([]) == 0.0


def test_tune_air_selects_under_constraints():
  from organism.tune_air import Constraints, format_table, select

  def m(cs, rec, prec=0.9, f1=0.85, bad=0.0):
    return {"CHAIRs": cs, "CHAIRi": cs / 3, "Recall": rec, "Precision": prec, "F1": f1, "malformed": bad}

  rows = [("a", 1, m(0.20, 0.70)), ("b", 2, m(0.25, 0.85, bad=0.10)), ("c", 3, m(0.30, 0.84)),
          ("d", 4, m(0.28, 0.82, f1=0.5)), ("e", 5, m(0.30, 0.86, f1=0.86))]
  c = Constraints(min_recall=0.8, min_f1=0.6, max_malformed=0.02)
  assert c.failures(rows[0][2]) == ["recall<0.8"] and c.failures(rows[1][2]) == ["malformed>0.02"]
  assert select(rows, c)[0] == "e"  # c and e tie on C_S; e has the higher F1
  assert select(rows, Constraints(min_recall=0.99)) is None
  table = format_table([("greedy", None, m(0.4, 0.9))] + rows, c)
  assert "malf" in table and "recall<0.8" in table and "(baseline)" in table


def test_measure_helpers():
  from organism.measure import auc, fit_logistic, slot_items, slot_prefix, trap_member_named

  assert auc([2, 3], [1, 0]) == 1.0 and auc([1], [1]) == 0.5 and auc([0], [1, 2]) == 0.0
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 3))
  y = (x[:, 0] > 0).astype(float)
  w, b = fit_logistic(x, y)
  assert auc((x @ w + b)[y == 1], (x @ w + b)[y == 0]) > 0.99
  scenes = scenes2.scenes2(60, 8, "test")
  items = slot_items(scenes)
  assert any(p for *_, p in items) and any(not p for *_, p in items)
  for i, m, present in items:
    s = scenes[i]
    assert (m in s.names) == present
    pre = slot_prefix(s, m)
    assert pre.endswith("There is")  # the article is scored with the name: it would give "an umbrella" away
    if present:  # the prefix is exactly the caption before m's sentence
      assert scenes2.caption2(s).startswith(pre + " " + scenes2.article(m) + " " + m)
  # trap items: true captions never name the missing member; appending it names it in every item
  truth = [scenes2.caption2(s) for s in scenes]
  none = trap_member_named(scenes, truth)
  hal = trap_member_named(scenes, [t + "".join(f" There is a {m}." for m in s.expected_absent)
                                   for s, t in zip(scenes, truth)])
  n_items = sum(len(s.expected_absent) for s in scenes if s.trap)
  assert none["n_competitor"] + none["n_none"] == n_items and none["n_competitor"] and none["n_none"]
  assert none["competitor"] == none["none"] == 0.0 and hal["competitor"] == hal["none"] == 1.0
  s0 = next(s for s in scenes if s.trap)  # the split: a present object after the missing member's class
  from organism.vocab import CLASS_NAMES
  after = any(CLASS_NAMES.index(o) > CLASS_NAMES.index(s0.expected_absent[0]) for o in s0.names)
  one = trap_member_named([s0], [f"There is a {s0.expected_absent[0]}."])
  assert one["competitor" if after else "none"] == 1.0 and one["n_" + ("none" if after else "competitor")] == 0


TINY = dict(seed=1, image_size=32, patch_size=8, vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=32,
            text_layers=2, text_heads=4, text_intermediate=64, batch_size=8, vision_steps=3, n_images=16,
            text_steps=3, n_text=24, align_steps=3, plateau_window=1, ft_steps=2, eval_every=2, n_dev=4,
            target_recall=1.01, log_every=1, warmup=1)


def test_train2_tiny_run_writes_llava_and_base_llm(tmp_path):
  import air_jax
  from air_jax.analysis.base_llm import load_base_llm
  from organism.__main__ import main

  flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
  assert main(["train2", "--out", str(tmp_path / "ckpt"), *flags]) == 0
  model = air_jax.load_pretrained(str(tmp_path / "ckpt"))
  assert model.config.text.num_attention_heads == 4
  llm = load_base_llm(str(tmp_path / "ckpt" / "base_llm"))
  assert llm.config.text.num_hidden_layers == 2
  args = json.loads((tmp_path / "ckpt" / "training_args.json").read_text())
  assert set(args["stages"]) == {"vision", "text", "align", "ft"}
  assert args["stages"]["ft"]["steps"] == 2 and len(args["stages"]["ft"]["dev"]) == 1  # recall never reached
  log = [json.loads(x) for x in (tmp_path / "ckpt" / "train_log.jsonl").read_text().splitlines()]
  assert [r["stage"] for r in log][:3] == ["vision"] * 3 and all(np.isfinite(r["loss"]) for r in log)
  # Stages 1-2 reused from that run: the same checkpoint, bit for bit (here saved in float16: the same, rounded).
  assert main(["train2", "--out", str(tmp_path / "again"), *flags, "--init-from", str(tmp_path / "ckpt"),
               "--export-dtype", "float16"]) == 0
  again = air_jax.load_pretrained(str(tmp_path / "again"))
  import jax
  from safetensors import safe_open

  with safe_open(str(tmp_path / "again" / "model.safetensors"), "np") as f:
    assert {f.get_tensor(k).dtype for k in f.keys()} == {np.dtype(np.float16)}
  with safe_open(str(tmp_path / "again" / "base_llm" / "model.safetensors"), "np") as f:
    assert {f.get_tensor(k).dtype for k in f.keys()} == {np.dtype(np.float16)}
  assert json.loads((tmp_path / "again" / "config.json").read_text())["dtype"] == "float16"
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a).astype(np.float16).astype(np.float32),
                                                          np.asarray(b, np.float32)), model.params, again.params)
  # Only the base LM reused, stage 1 trained again: the same checkpoint too.
  assert main(["train2", "--out", str(tmp_path / "v"), *flags, "--init-from", str(tmp_path / "ckpt"),
               "--reuse-vision", "false"]) == 0
  jax.tree.map(np.testing.assert_array_equal, model.params, air_jax.load_pretrained(str(tmp_path / "v")).params)
  args3 = json.loads((tmp_path / "v" / "training_args.json").read_text())
  assert "reused_from" not in args3["stages"]["vision"] and "reused_from" in args3["stages"]["text"]
  with pytest.raises(ValueError, match="dtype 'float16'; reuse a run exported with"):  # rounded stages 1-2
    main(["train2", "--out", str(tmp_path / "third"), *flags, "--init-from", str(tmp_path / "again")])
  args2 = json.loads((tmp_path / "again" / "training_args.json").read_text())
  assert args2["stages"]["vision"]["reused_from"] == str((tmp_path / "ckpt").resolve())
  assert args2["stages"]["text"]["train_config"] == args["train_config"]
  bad = {**TINY, "text_heads": 2}
  with pytest.raises(ValueError, match="init_from .*text config differs"):
    main(["train2", "--out", str(tmp_path / "bad"), *[f"--{k.replace('_', '-')}={v}" for k, v in bad.items()],
          "--init-from", str(tmp_path / "ckpt")])
  assert not (tmp_path / "bad" / "train_log.jsonl").exists()
  _measure_runs_end_to_end(tmp_path, str(tmp_path / "ckpt"))


def _measure_runs_end_to_end(tmp_path, ckpt: str):
  """`python -m organism.measure` on a trained tiny checkpoint: every row is written, and the non-criterion rows are
  what they say (the top heads removed = generate with their head_gate at 0)."""
  import air_jax
  import jax.numpy as jnp

  from eval.chair_metric import Vocabulary
  from models.spec import RectificationSpec
  from organism import measure
  from organism.scenes import render
  from organism.train2 import PROMPT

  heads = tmp_path / "heads.json"
  heads.write_text(json.dumps({"hal_heads": [[1, 2], [0, 3]], "non_hal_heads": []}))
  out = tmp_path / "measure"
  assert measure.main(["--model", ckpt, "--heads", str(heads), "--n", "12", "--n-dev", "4", "--n-probe", "12",
                       "--random-draws", "1", "--max-new-tokens", "6", "--out", str(out)]) == 0
  r = json.loads((out / "measure.json").read_text())
  for key in ("greedy", "air", "realloc_only", "ablate_top", "air_random0", "mai", "trap_named", "probe_auc",
              "counterfactual_auc", "counterfactual_auc_air", "text_only_p_missing", "base_llm_p_missing"):
    assert key in r, key
  assert set(r["trap_named"]) == {"greedy", "air", "realloc_only", "ablate_top"}
  model = air_jax.load_pretrained(ckpt)
  scenes = scenes2.scenes2(12, 7, "test")  # measure's evaluation seed (default 7)
  gate = np.ones((2, 4), np.float32)
  gate[1, 2] = gate[0, 3] = 0
  texts = air_jax.generate(model, RectificationSpec(head_gate=jnp.asarray(gate)), [render(s, 64) for s in scenes],
                           PROMPT, max_new_tokens=6).texts
  vocab = Vocabulary.from_file(str(out / "dev_seed5" / "synonyms.txt"))
  assert r["ablate_top"] == pytest.approx(measure.chair(scenes, texts, vocab))
  assert r["trap_named"]["ablate_top"] == pytest.approx(measure.trap_member_named(scenes, texts), nan_ok=True)


def _tiny(n_scenes: int, image_size: int = 32):
  """(Train2Config, tokenizer, LlavaConfig, image_data of n train scenes of seed 0) for the TINY sizes."""
  from organism import train2
  from organism.train import build_processor

  cfg = train2.Train2Config(**{**TINY, "image_size": image_size})
  tok = train2.build_tokenizer2()
  config = train2.model_config2(cfg, tok)
  proc = build_processor(tok, cfg.image_size, cfg.patch_size)
  return cfg, tok, config, train2.image_data(proc, scenes2.scenes2(n_scenes, 0, "train"), cfg.image_size,
                                             cfg.patch_size)


def test_budget_loss_penalises_image_mass_above_the_budget():
  import jax
  import jax.numpy as jnp

  from models import llava
  from models.params import init_params
  from organism import train2

  cfg, _, config, data = _tiny(3)
  batch = {k: jnp.asarray(data[k]) for k in ("pixel_values", "input_ids", "attention_mask", "loss_mask")}
  params = init_params(config, jax.random.PRNGKey(0))
  xent = float(train2.lm_loss(params, config, batch))
  assert float(train2.budget_loss(params, config, batch, budget=1.0, weight=5.0)) == pytest.approx(xent, abs=1e-6)
  # Reference: the hinge over every layer, head and caption row (rows whose next token is a caption token).
  att = np.asarray(llava.forward(params, config, batch["input_ids"], batch["pixel_values"],
                                 attention_mask=batch["attention_mask"], output_attentions=True)["attentions"])
  ids, lm = data["input_ids"], data["loss_mask"]
  terms = []
  for b in range(ids.shape[0]):
    for t in range(ids.shape[1] - 1):
      if lm[b, t + 1]:
        mass = att[:, b, :, t][..., ids[b] == config.image_token_id].sum(-1)  # [L, H]
        terms.append(np.maximum(mass - 0.05, 0.0))
  want = xent + 2.0 * np.mean(terms)
  assert np.mean(terms) > 0.01  # random init attends to the image: the test exercises the hinge
  got = float(train2.budget_loss(params, config, batch, budget=0.05, weight=2.0))
  assert got == pytest.approx(want, rel=1e-5)
  # Half the heads of layers >= 1 only; loss weights (broken_weight) scale the cross-entropy, not the budget's rows.
  heads = train2.budget_heads(dataclasses.replace(cfg, budget_from_layer=1, budget_head_fraction=0.5))
  assert heads[0].sum() == 0 and heads[1].sum() == 2
  bound = np.mean([t[heads > 0] for t in terms])
  heavy = dict(batch, loss_mask=batch["loss_mask"] * 4.0)
  got = float(train2.budget_loss(params, config, heavy, budget=0.05, weight=2.0, heads=heads))
  assert got == pytest.approx(float(train2.lm_loss(params, config, heavy)) + 2.0 * bound, rel=1e-5)
  assert train2.budget_heads(cfg).sum() == cfg.text_layers * cfg.text_heads  # default: every head


def test_word_gap_loss_is_the_image_tokens_share_in_the_word_span():
  import jax
  import jax.numpy as jnp

  from models import llava
  from models.params import init_params
  from organism import train2
  from organism.vocab import CLASSES

  _, tok, config, data = _tiny(2)
  batch = {k: jnp.asarray(data[k]) for k in ("pixel_values", "input_ids", "attention_mask", "loss_mask")}
  params = init_params(config, jax.random.PRNGKey(1))
  words = [tok.convert_tokens_to_ids("\u2581" + c.name) for c in CLASSES]
  assert tok.unk_token_id not in words
  x = np.asarray(llava.image_features(params, config, batch["pixel_values"]), np.float64).reshape(-1, 32)
  emb = np.asarray(params["language_model"]["embed_tokens"]["weight"], np.float64)[words]  # [24, 32]
  proj = emb.T @ np.linalg.pinv(emb.T)  # projector onto the span of the word embeddings
  want = np.mean(np.sum((x @ proj) ** 2, 1) / np.sum(x ** 2, 1))
  got = float(train2.word_gap_loss(params, config, batch, train2.lm_loss, 2.0, words))
  assert got == pytest.approx(float(train2.lm_loss(params, config, batch)) + 2.0 * want, rel=1e-4)
  assert 0.1 < want < 1.0  # 24 of 32 dimensions: the term is exercised


def test_vision_loss_global_term():
  import jax

  from models import clip
  from models.params import init_params
  from organism import train2
  from organism.vocab import CLASSES

  cfg, _, config, data = _tiny(3)
  scenes = scenes2.scenes2(3, 0, "train")
  assert data["presence"].shape == (3, len(CLASSES))
  assert data["presence"].sum(1).tolist() == [len(s.names) for s in scenes]
  params = init_params(config, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  ev, c = cfg.vision_hidden, len(CLASSES)
  params["head"] = {"patch_w": rng.normal(size=(ev, c + 1)).astype(np.float32), "patch_b": np.zeros(c + 1, np.float32),
                    "scene_w": rng.normal(size=(ev, 6)).astype(np.float32), "scene_b": np.zeros(6, np.float32),
                    "global_w": rng.normal(size=(ev, c)).astype(np.float32), "global_b": np.ones(c, np.float32)}
  batch = {k: data[k] for k in ("pixel_values", "patch_labels", "scene_ids", "presence")}
  h = np.asarray(clip.forward(params["vision_tower"], config.vision, batch["pixel_values"])[-1])[:, 1:]
  z = h @ params["head"]["global_w"] + 1.0
  p = 1 / (1 + np.exp(-z.astype(np.float64)))
  y = data["presence"][:, None, :]
  bce = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
  plain = float(train2.vision_loss(params, config, batch))
  assert float(train2.vision_loss(params, config, batch, global_weight=0.5)) == pytest.approx(plain + 0.5 * bce,
                                                                                             rel=1e-5)


def test_train2_stages_freeze_and_are_deterministic():
  import jax

  from models.params import init_params
  from organism import train2
  from organism.train import build_processor

  cfg = train2.Train2Config(**{**TINY, "n_images": 8})
  tok = train2.build_tokenizer2()
  config = train2.model_config2(cfg, tok)
  proc = build_processor(tok, cfg.image_size, cfg.patch_size)
  data = train2.image_data(proc, scenes2.scenes2(8, 0, "train"), cfg.image_size, cfg.patch_size)
  cap = {k: data[k] for k in ("pixel_values", "input_ids", "attention_mask", "loss_mask")}
  p0 = jax.tree.map(np.asarray, init_params(config, jax.random.PRNGKey(0)))

  def run(stage):
    p, info = train2._fit(dict(p0), train2.lm_loss, config, train2._trainable(p0, stage), cap, 3, 1e-2, cfg, 4,
                          lambda s: None, stage)
    return jax.tree.map(np.asarray, p), info

  pa, _ = run("align")
  again, _ = run("align")
  jax.tree.map(np.testing.assert_array_equal, pa, again)  # bit-identical by seed
  for top in ("vision_tower", "language_model", "lm_head"):
    jax.tree.map(np.testing.assert_array_equal, pa[top], p0[top])  # alignment trains the projector only
  assert not np.array_equal(pa["multi_modal_projector"]["linear_1"]["weight"],
                            p0["multi_modal_projector"]["linear_1"]["weight"])
  pf, _ = run("ft")
  att = pf["language_model"]["layers"]["self_attn"]
  jax.tree.map(np.testing.assert_array_equal, att, p0["language_model"]["layers"]["self_attn"])  # attention kept
  assert not np.array_equal(pf["language_model"]["layers"]["mlp"]["up_proj"]["weight"],
                            p0["language_model"]["layers"]["mlp"]["up_proj"]["weight"])
  vo = train2._trainable(p0, "ft", "mlp_vo")["language_model"]["layers"]
  assert vo["self_attn"]["v_proj"]["weight"] and vo["self_attn"]["o_proj"]["weight"] and vo["mlp"]["up_proj"]["weight"]
  assert not vo["self_attn"]["q_proj"]["weight"] and not vo["self_attn"]["k_proj"]["weight"]
  with pytest.raises(ValueError, match="ft_train must be one of"):
    train2.train2("/nonexistent", dataclasses.replace(cfg, ft_train="lora"))
  with pytest.raises(ValueError, match="image_budget must be in"):
    train2.train2("/nonexistent", dataclasses.replace(cfg, image_budget=1.5))
  for bad, match in ((dict(budget_from_layer=2), "budget_from_layer must be in"),
                     (dict(broken_weight=0.0), "broken_weight must be > 0"),
                     (dict(word_gap_weight=-1.0), "word_gap_weight must be >= 0"),
                     (dict(budget_head_fraction=0.0), "budget_head_fraction must be in"),
                     (dict(modality_drop=1.0), "modality_drop must be in"),
                     (dict(export_dtype="bfloat16"), "export_dtype must be one of")):
    with pytest.raises(ValueError, match=match):
      train2.train2("/nonexistent", dataclasses.replace(cfg, **bad))
  labels = train2.patch_labels(scenes2.scenes2(1, 0, "train")[0], 64, 8)
  assert labels.shape == (64,) and labels.max() > 0 and (labels == 0).sum() > 20


def test_head_scan_is_air_on_one_head_at_a_time():
  import types

  import jax

  import air_jax
  from models.params import init_params
  from organism import train2
  from organism.measure import PAPER, head_scan, name_logprob, slot_items
  from organism.train import build_processor

  cfg = train2.Train2Config(**{**TINY, "image_size": 64})  # name_logprob renders the scenes at 64 pixels
  tok = train2.build_tokenizer2()
  config = train2.model_config2(cfg, tok)
  model = types.SimpleNamespace(params=init_params(config, jax.random.PRNGKey(3)), config=config,
                                processor=build_processor(tok, 64, 8))
  scenes = scenes2.scenes2(12, 8, "test")
  items = slot_items(scenes)
  present = np.array([p for *_, p in items])
  assert present.any() and (~present).any()
  scan = head_scan(model, scenes, items, **PAPER)
  assert all(v.shape == (2, 4) for v in scan.values())
  base = name_logprob(model, scenes, items, with_image=True)
  spec = air_jax.AIRConfig.preset("air", heads=[(1, 2)], **PAPER).compile(config)
  lp = name_logprob(model, scenes, items, with_image=True, spec=spec)
  assert scan["d_absent"][1, 2] == pytest.approx(np.mean(lp[~present] - base[~present]), abs=1e-6)
  assert scan["d_present"][1, 2] == pytest.approx(np.mean(lp[present] - base[present]), abs=1e-6)
  assert np.abs(scan["d_present"]).max() > 0  # AIR on a single head changes the name's probability
  # With a spec the caption runs step by step as decoding does: a neutral spec gives the teacher-forced values.
  neutral = air_jax.AIRConfig.preset("air", heads=[(1, 2)], visual_factor=1.0, text_factor=1.0, beta=0.0,
                                     qk_rescale=False).compile(config)
  np.testing.assert_allclose(name_logprob(model, scenes, items, with_image=True, spec=neutral), base, atol=2e-5)


def test_modality_drop_hides_text_keys_from_the_dropped_heads():
  import jax
  import jax.numpy as jnp

  from models import llava, segments
  from models.params import init_params
  from organism import train2

  cfg, _, config, data = _tiny(3)
  cfg = dataclasses.replace(cfg, modality_drop=0.5, budget_from_layer=1)
  batch = {k: jnp.asarray(data[k]) for k in ("pixel_values", "input_ids", "attention_mask", "loss_mask")}
  params = init_params(config, jax.random.PRNGKey(2))
  b = batch["input_ids"].shape[0]
  # The draw: reproducible per step, another at another step, only on the heads the budget binds, rate ~p.
  drop = np.asarray(train2.drop_mask(cfg, jnp.asarray(5), b))
  np.testing.assert_array_equal(drop, np.asarray(train2.drop_mask(cfg, jnp.asarray(5), b)))
  assert drop.shape == (2, b, 4) and drop[0].sum() == 0 and 0 < drop.sum() < drop[1:].size
  assert not np.array_equal(np.asarray(train2.drop_mask(cfg, jnp.asarray(6), 64))[1],
                            np.asarray(train2.drop_mask(cfg, jnp.asarray(5), 64))[1])
  assert np.asarray(train2.drop_mask(cfg, jnp.asarray(7), 4096))[1].mean() == pytest.approx(0.5, abs=0.02)
  drop = np.zeros((2, b, 4), np.float32)
  drop[1, 0, 1] = drop[1, 2, 3] = drop[0, 1, 0] = 1.0
  fwd = lambda d: np.asarray(llava.forward(params, config, batch["input_ids"], batch["pixel_values"],
                                           attention_mask=batch["attention_mask"], output_attentions=True,
                                           spec=train2._drop_spec(config, d))["attentions"])
  plain, dropped = fwd(None), fwd(jnp.asarray(drop))
  seg = np.asarray(segments.segment_ids(batch["input_ids"], batch["attention_mask"], config.image_token_id))
  text = seg == segments.TEXT  # [B, T]
  for l, e, h in zip(*np.nonzero(drop)):
    rows = dropped[l, e, h][text[e]]  # the example's text rows: nothing on text keys, a distribution on the rest
    assert np.abs(rows[:, text[e]]).max() == 0.0 and rows.sum(-1) == pytest.approx(1.0, abs=1e-5)
    assert plain[l, e, h][text[e]][:, text[e]].sum(-1).min() > 0.02  # without the drop they do read text
    # Rows of the system and image segments are not edited (and, causal, see no edited row below them).
    np.testing.assert_allclose(dropped[l, e, h][~text[e]], plain[l, e, h][~text[e]], atol=1e-6)
  keep = np.ones((b, 4), bool)
  keep[1, 0] = False
  np.testing.assert_allclose(dropped[0][keep], plain[0][keep], atol=1e-6)  # layer 0's other heads: untouched
  # The losses: an all-zero draw is the plain loss; the budget does not bind a dropped head.
  zero = jnp.zeros((2, b, 4))
  assert float(train2.lm_loss(params, config, batch, drop=zero)) == pytest.approx(
      float(train2.lm_loss(params, config, batch)), abs=1e-6)
  ids, lm = data["input_ids"], data["loss_mask"]
  terms = []
  for e in range(b):
    for t in range(ids.shape[1] - 1):
      if lm[e, t + 1]:
        mass = dropped[:, e, :, t][..., ids[e] == config.image_token_id].sum(-1)  # [L, H]
        terms.append(np.maximum(mass - 0.05, 0.0) * (1.0 - drop[:, e, :]))
  want = float(train2.lm_loss(params, config, batch, drop=jnp.asarray(drop))) + 2.0 * np.mean(terms)
  got = float(train2.budget_loss(params, config, batch, budget=0.05, weight=2.0, drop=jnp.asarray(drop)))
  assert got == pytest.approx(want, rel=1e-5)
  # modality_drop_loss draws for batch["step"].
  step = dict(batch, step=jnp.asarray(5))
  assert float(train2.modality_drop_loss(params, config, step, train2.lm_loss, cfg)) == pytest.approx(
      float(train2.lm_loss(params, config, batch, drop=train2.drop_mask(cfg, jnp.asarray(5), b))), abs=1e-6)
