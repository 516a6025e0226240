"""eval.describe: several methods side by side on a few images, equal to air_jax.generate; clear errors."""

import json

import numpy as np

import air_jax
from eval.describe import main
from tests.tiny import random_images


def _images(tmp_path, n=2):
  paths = []
  for i, im in enumerate(random_images(n, 30, seed=3)):
    paths.append(str(tmp_path / f"im{i}.png"))
    im.save(paths[-1])
  return paths


def test_methods_side_by_side_equal_generate(tmp_path, tiny_dir, tiny_model, capsys):
  paths = _images(tmp_path)
  out_json = tmp_path / "d.json"
  assert main(paths + ["--model", tiny_dir, "--method", "greedy,vcd", "--max-new-tokens", "5", "--stats",
                       "--json", str(out_json)]) == 0
  printed = capsys.readouterr().out
  records = json.loads(out_json.read_text())
  assert [(r["method"], r["image_index"]) for r in records] == [("greedy", 0), ("greedy", 1), ("vcd", 0), ("vcd", 1)]
  prompt = "Please describe this image in detail."
  for name in ("greedy", "vcd"):
    want = air_jax.generate(tiny_model, name, paths, prompt, max_new_tokens=5, output_attention_stats=True)
    got = [r for r in records if r["method"] == name]
    for i, r in enumerate(got):
      n = int(want.num_tokens[i])
      assert r["token_ids"] == want.token_ids[i, :n].tolist() and r["text"] == want.texts[i]
      mass = np.asarray(want.segment_mass[i, :n], np.float64).reshape(-1, 3).mean(0)
      np.testing.assert_allclose([r["attention_mass"][k] for k in ("system", "image", "text")], mass, rtol=1e-6)
      assert f"{r['method']:<6}  {r['text']}" in printed
  assert records[2]["hyperparameters"]["alpha"] == 1.0  # the resolved VCD preset is recorded
  assert printed.count("attention mass: image") == 4


def test_errors_name_the_problem(tmp_path, tiny_dir, capsys):
  paths = _images(tmp_path, 1)
  assert main(paths) == 2
  assert "--model is required" in capsys.readouterr().err
  assert main(paths + ["--model", tiny_dir, "--method", "greedy,nope"]) == 2
  assert "unknown method 'nope'" in capsys.readouterr().err
  assert main([str(tmp_path / "missing.png"), "--model", tiny_dir]) == 2
  err = capsys.readouterr().err
  assert "missing.png" in err and "Traceback" not in err
  assert main(paths + ["--model", tiny_dir, "--method", "air"]) == 2  # the AIR family needs heads
  assert "heads" in capsys.readouterr().err
  # Options a method cannot take are refused before anything runs (greedy first would have run for nothing).
  assert main(paths + ["--model", tiny_dir, "--method", "greedy,vcd", "--num-beams", "2"]) == 2
  assert "method vcd: num_beams=2: beam search runs with methods that only edit attention" in \
      capsys.readouterr().err
  assert main(paths + ["--model", tiny_dir, "--method", "greedy,opera", "--do-sample"]) == 2
  assert "method opera: OperaPlan runs a deterministic search" in capsys.readouterr().err
