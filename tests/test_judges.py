"""Judges: the HTTP judge against a stub server on 127.0.0.1, the cache, failures, and the local JAX judge."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from eval import judges
from tests.judge_stub import StubServer, chat_reply

SECRET = "sk-test-secret-0123456789"


def test_http_judge_sends_key_caches_and_never_writes_it(tmp_path, caplog):
  with StubServer(lambda body: (200, chat_reply("Rating: 5"), 0)) as srv:
    env = {"AIR_JUDGE_BASE_URL": srv.url, "AIR_JUDGE_MODEL": "judge-x", "AIR_JUDGE_API_KEY": SECRET}
    judge = judges.CachedJudge(judges.OpenAIChatJudge.from_env(env=env), tmp_path / "cache")
    with caplog.at_level(logging.DEBUG):
      r1 = judge.ask("Is this a cat?", temperature=0.0, max_tokens=3)
      r2 = judge.ask("Is this a cat?", temperature=0.0, max_tokens=3)
      r3 = judge.ask("Is this a dog?", temperature=0.0, max_tokens=3)
    assert r1.ok and r1.text == "Rating: 5" and not r1.cached and r1.info["model"] == "stub-judge"
    assert r2.cached and r2.text == r1.text and not r3.cached
    assert len(srv.requests) == 2 and judge.calls == 2  # the repeat came from the cache
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer " + SECRET
    assert req["body"] == {"model": "judge-x", "messages": [{"role": "user", "content": "Is this a cat?"}],
                           "temperature": 0.0, "max_tokens": 3}
  assert judge.identity == {"kind": "openai_chat", "base_url": srv.url, "model": "judge-x"}
  assert SECRET not in repr(judge.judge) and SECRET not in caplog.text
  for f in (tmp_path / "cache").rglob("*"):
    if f.is_file():
      assert SECRET not in f.read_text()
  # a judge with another identity does not see this cache
  other = judges.CachedJudge(judges.OpenAIChatJudge(srv.url, "judge-y"), tmp_path / "cache")
  assert other.key("Is this a cat?", 0.0, 3, 0) != judge.key("Is this a cat?", 0.0, 3, 0)


def test_http_judge_failures_are_replies_not_crashes(tmp_path):
  state = {"n": 0}

  def responder(body):
    prompt = body["messages"][0]["content"]
    if prompt == "slow":
      return 200, chat_reply("late"), 1.5
    if prompt == "garbage":
      return 200, b"<html>not json</html>", 0
    if prompt == "empty":
      return 200, {"error": "no choices"}, 0
    if prompt == "flaky":
      state["n"] += 1
      return (503, {"error": "busy"}, 0) if state["n"] == 1 else (200, chat_reply("fine"), 0)
    if prompt == "denied":
      return 401, {"error": "bad key"}, 0
    if prompt == "hang up":
      return None, None, 0
    if prompt == "drops once":
      state["d"] = state.get("d", 0) + 1
      return (None, None, 0) if state["d"] == 1 else (200, chat_reply("back"), 0)
    return 200, chat_reply("ok"), 0

  with StubServer(responder) as srv:
    judge = judges.CachedJudge(judges.OpenAIChatJudge(srv.url, "m", SECRET, timeout=0.5, max_retries=1, backoff=0),
                               tmp_path / "cache")
    slow = judge.ask("slow")
    assert not slow.ok and "timed out" in slow.error
    assert "not JSON" in judge.ask("garbage").error
    assert "choices" in judge.ask("empty").error
    assert "HTTP 401" in judge.ask("denied").error
    assert judge.ask("flaky").text == "fine"  # a 503 is retried
    assert "connection failed (RemoteDisconnected) (2 attempts)" in judge.ask("hang up").error  # a reply, no crash
    assert judge.ask("drops once").text == "back"  # a dropped connection is retried
    for r in (slow,):
      assert SECRET not in r.error
    before = judge.calls
    assert not judge.ask("slow").cached and judge.calls == before + 1  # failures are not cached: retried on rerun


def test_http_judge_keeps_credentials_out_of_identities_and_errors(tmp_path, caplog):
  """A key read with its line ending is trimmed; one a header cannot carry is refused without echoing it; a
  credential in the URL's query stays out of the identity, logs and results; user info in the URL is refused."""
  with StubServer(lambda body: (200, chat_reply("ok"), 0)) as srv:
    judge = judges.OpenAIChatJudge(srv.url + "?api-key=" + SECRET, "m", SECRET + "\r\n")
    assert judge.complete("hi")[0] == "ok"
    req = srv.requests[0]
    assert req["headers"]["Authorization"] == "Bearer " + SECRET and req["path"].startswith("/v1/chat/completions")
    assert SECRET not in json.dumps(judge.identity) and SECRET not in repr(judge)
  for bad in (SECRET + "\x01", SECRET + "\u20ac"):
    with pytest.raises(ValueError, match="AIR_JUDGE_API_KEY .* holds a control or non-Latin-1") as e:
      judges.OpenAIChatJudge("http://h/v1", "m", bad)
    assert SECRET not in str(e.value)
  with pytest.raises(ValueError, match="carries user info") as e:
    judges.OpenAIChatJudge(f"http://user:{SECRET}@h/v1", "m")
  assert SECRET not in str(e.value)
  with StubServer(lambda body: (401, {"error": "bad key"}, 0)) as srv:
    r = judges.CachedJudge(judges.OpenAIChatJudge(srv.url, "m", SECRET, max_retries=0), tmp_path / "c").ask("x")
  assert "HTTP 401" in r.error and "check AIR_JUDGE_API_KEY" in r.error and SECRET not in r.error


def test_http_judge_bad_config():
  with pytest.raises(ValueError, match="http"):
    judges.OpenAIChatJudge("ftp://x", "m")
  with pytest.raises(ValueError, match="AIR_JUDGE_TIMEOUT"):
    judges.OpenAIChatJudge.from_env(env={"AIR_JUDGE_TIMEOUT": "soon"})


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
  """A tiny random LlamaForCausalLM saved with transformers (safetensors) and the tests' tokenizer."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  from tests.tiny import train_tokenizer

  path = tmp_path_factory.mktemp("tiny_llama_judge")
  tok = train_tokenizer()
  cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  torch.manual_seed(0)
  model = LlamaForCausalLM(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        p.normal_(0.0, 0.2)
  model.eval()
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return path


def test_local_judge_equals_transformers_greedy(tiny_llama_dir, tmp_path):
  import torch
  from transformers import AutoTokenizer, LlamaForCausalLM

  prompt = "What is in the picture? There are two apples"
  judge = judges.CachedJudge(judges.LocalLMJudge(tiny_llama_dir, default_max_tokens=12), tmp_path / "cache")
  reply = judge.ask(prompt, max_tokens=12)
  assert reply.ok, reply.error
  tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
  model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
  ids = tok(prompt, return_tensors="pt")["input_ids"]
  with torch.no_grad():
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
  expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
  assert reply.text == expected and len(expected) > 3
  assert judge.ask(prompt, max_tokens=12).cached
  ident = judge.identity
  assert ident["kind"] == "local_hf" and len(ident["model_sha256"]) == 64
  import shutil

  moved = tmp_path / "moved_judge"
  shutil.copytree(tiny_llama_dir, moved)  # the same checkpoint elsewhere shares the cache
  assert judges.CachedJudge(judges.LocalLMJudge(moved), tmp_path / "cache").ask(prompt, max_tokens=12).cached


def test_local_judge_rejects_a_non_llama_checkpoint(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
  judge = judges.LocalLMJudge(tmp_path)
  with pytest.raises(ValueError, match="model_type 'gpt2'"):
    judge.complete("hi")
  np.testing.assert_equal(judge.identity["kind"], "local_hf")
