"""Checkpoints named by Hugging Face repository id: resolved through a local hub cache (offline), never pickles."""

import os
import shutil

import jax
import numpy as np
import pytest

import air_jax
from air_jax import hub

SHA = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache, repo, src_files, sha=SHA, ref="main"):
  """Lays out `repo` in a Hugging Face hub cache as huggingface_hub does (refs/<ref> -> snapshots/<sha>)."""
  base = cache / ("models--" + repo.replace("/", "--"))
  snap = base / "snapshots" / sha
  snap.mkdir(parents=True, exist_ok=True)
  for src in src_files:
    shutil.copy(src, snap / os.path.basename(src))
  (base / "refs").mkdir(exist_ok=True)
  (base / "refs" / ref).write_text(sha)
  return snap


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
  cache = tmp_path / "hub"
  cache.mkdir()
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return cache


def test_repo_id_loads_from_the_cache(tiny_dir, tiny_model, offline_cache):
  files = [os.path.join(tiny_dir, f) for f in os.listdir(tiny_dir) if os.path.isfile(os.path.join(tiny_dir, f))]
  snap = _cache_repo(offline_cache, "org/tiny-llava", files)
  model = air_jax.load_pretrained("org/tiny-llava")
  assert os.path.samefile(model.path, snap)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), model.params, tiny_model.params)
  assert all(jax.tree.leaves(same))
  # A pinned revision (the commit) resolves to the same snapshot; so does the processor alone.
  assert os.path.samefile(air_jax.resolve_checkpoint(f"org/tiny-llava@{SHA}"), snap)
  from air_jax.loading import load_processor

  assert load_processor("org/tiny-llava") is not None


def test_missing_repo_is_a_clear_error(offline_cache):
  with pytest.raises(hub.CheckpointNotFoundError, match=r"--model 'org/absent'.*HF_HUB_OFFLINE.*hf download org/absent"):
    hub.resolve_checkpoint("org/absent", what="--model")
  with pytest.raises(FileNotFoundError, match="org/absent"):
    air_jax.load_pretrained("org/absent")
  # Not an id and not a path: returned as given, so the caller's own error names it.
  assert hub.resolve_checkpoint("no_such_dir") == "no_such_dir"


def test_local_path_wins_over_a_repo_id(tmp_path, monkeypatch, offline_cache):
  (tmp_path / "org" / "name").mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  assert hub.resolve_checkpoint("org/name") == "org/name"


def test_plan_needs_only_the_config(tiny_dir, offline_cache):
  _cache_repo(offline_cache, "org/config-only", [os.path.join(tiny_dir, "config.json")])
  from air_jax.plan import plan as memory_plan

  plan = memory_plan("org/config-only", devices=1, dtype="float32", new_tokens=4)
  assert plan == memory_plan(tiny_dir, devices=1, dtype="float32", new_tokens=4) and plan.num_params > 0
  with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
    air_jax.load_pretrained("org/config-only", with_processor=False)


def test_only_safe_files_are_fetched():
  from huggingface_hub.utils import filter_repo_objects

  repo_files = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                "pytorch_model.bin", "original/consolidated.00.pth", "model.ckpt", "optimizer.pt", "modeling_x.py",
                "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                "qformer_tokenizer/vocab.txt", "chat_template.jinja", "preprocessor_config.json", "README.md",
                "training_args.pkl"]
  got = set(filter_repo_objects(repo_files, allow_patterns=list(hub.WEIGHT_PATTERNS)))
  assert got == {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                 "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                 "qformer_tokenizer/vocab.txt", "chat_template.jinja", "preprocessor_config.json"}
  assert set(filter_repo_objects(repo_files, allow_patterns=list(hub.CONFIG_PATTERNS))) <= {
      "config.json", "model.safetensors.index.json", "tokenizer_config.json", "vocab.json",
      "tokenizer.json", "preprocessor_config.json"}


def test_cli_names_the_flag(tmp_path, offline_cache, capsys):
  from eval import attribute

  code = attribute.main(["--model", "org/absent", "--chair-json", str(tmp_path / "x.json"), "--coco-root",
                         str(tmp_path), "--out", str(tmp_path / "out")])
  assert code == 2
  err = capsys.readouterr().err
  assert "--model 'org/absent'" in err and "Traceback" not in err


def test_recorded_snapshot_of_another_machine_resolves(tiny_dir, offline_cache):
  snap = _cache_repo(offline_cache, "org/tiny-llava", [os.path.join(tiny_dir, "config.json")])
  elsewhere = f"/home/someone/.cache/huggingface/hub/models--org--tiny-llava/snapshots/{SHA}"
  assert hub.parse_repo_id(elsewhere) == ("org/tiny-llava", SHA)
  assert os.path.samefile(hub.resolve_checkpoint(elsewhere, config_only=True), snap)
  # Another commit is not in this cache: the error names it rather than loading other weights.
  other = elsewhere.replace(SHA, "f" * 40)
  with pytest.raises(hub.CheckpointNotFoundError, match="f" * 40):
    hub.resolve_checkpoint(other)


@pytest.mark.parametrize("env, want", [
    ({"HF_HUB_CACHE": "/a", "HUGGINGFACE_HUB_CACHE": "/b", "HF_HOME": "/c"}, "/a"),
    ({"HUGGINGFACE_HUB_CACHE": "/b", "HF_HOME": "/c"}, "/b"),
    ({"HF_HOME": "/c", "XDG_CACHE_HOME": "/x"}, "/c/hub"),
    ({"XDG_CACHE_HOME": "/x"}, "/x/huggingface/hub"),
])
def test_cache_directory_follows_huggingface_hub(monkeypatch, env, want):
  for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert hub._cache_dir() == want
  # huggingface_hub's own reading of the same environment (it reads it at import: a fresh interpreter)
  import subprocess
  import sys

  got = subprocess.run([sys.executable, "-c", "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"],
                       capture_output=True, text=True, env={**os.environ}, check=True).stdout.strip()
  assert got == want


def test_download_hint_and_foreign_paths(offline_cache):
  with pytest.raises(hub.CheckpointNotFoundError) as e:
    hub.resolve_checkpoint("org/absent")
  for p in hub.WEIGHT_PATTERNS:  # one --include per pattern: hf download takes one value per flag
    assert f"--include '{p}'" in str(e.value)
  win = rf"C:\Users\me\.cache\huggingface\hub\models--org--name\snapshots\{SHA}"
  assert hub.parse_repo_id(win) == ("org/name", SHA)
