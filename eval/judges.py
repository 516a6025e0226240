"""Pluggable LLM judges for MMHal-Bench and MM-Vet, with an on-disk cache of every call.

A judge has an ``identity`` (a JSON object naming what answers: kind, model, endpoint or checkpoint hash; never
a secret) and ``complete(prompt, temperature=, max_tokens=) -> (text, info)``, raising ``JudgeError`` when no
answer came (timeout, HTTP error, malformed reply). ``CachedJudge`` wraps one: every call is keyed by the
SHA-256 of (identity, prompt, temperature, max_tokens, run) and its reply stored under ``<cache>/<k[:2]>/<k>.json``
(atomically), so reruns are free and deterministic; a failed call is returned as a reply with ``error`` set
(never raised) and not cached, so a rerun retries it.

Judges:
  * ``OpenAIChatJudge``: any OpenAI-compatible ``/chat/completions`` endpoint. From the environment:
    ``AIR_JUDGE_BASE_URL`` (default https://api.openai.com/v1), ``AIR_JUDGE_MODEL`` (default gpt-4-0613),
    ``AIR_JUDGE_API_KEY`` (else ``OPENAI_API_KEY``; may be empty for local servers), ``AIR_JUDGE_TIMEOUT``
    seconds (default 60). The key is only ever put in the Authorization header: it is not part of the identity,
    the cache, the results, the logs or any error message.
  * ``LocalLMJudge``: a Hugging Face Llama causal-LM directory decoded by air-jax's JAX decoder
    (``eval.local_lm``); its identity holds the directory's content hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from air_jax.atomic import atomic_write_json

log = logging.getLogger("eval.judges")

CACHE_VERSION = 1
JUDGE_KINDS = ("openai", "local")


class JudgeError(RuntimeError):
  """A judge call that produced no answer (the message never contains a secret)."""


@dataclasses.dataclass
class JudgeReply:
  """One judge answer: ``text`` (None when the call failed), ``error``, whether it came from the cache."""

  text: str | None
  error: str | None = None
  cached: bool = False
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def ok(self) -> bool:
    return self.error is None and self.text is not None


class Judge:
  """Interface: ``identity`` (JSON, no secrets) and ``complete``."""

  @property
  def identity(self) -> dict[str, Any]:
    raise NotImplementedError

  def complete(self, prompt: str, *, temperature: float = 0.0, max_tokens: int | None = None
               ) -> tuple[str, dict[str, Any]]:
    """The judge's answer to one user message, and extra info (e.g. the model that answered)."""
    raise NotImplementedError


def _public_url(url: str) -> str:
  """The URL without user info, query or fragment (where credentials may ride), for identities and logs."""
  parts = urllib.parse.urlsplit(url)
  host = parts.hostname or ""
  if ":" in host:  # IPv6 literal
    host = f"[{host}]"
  if parts.port:
    host = f"{host}:{parts.port}"
  return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


class OpenAIChatJudge(Judge):
  """An OpenAI-compatible chat-completions endpoint over HTTP (urllib; no client library needed)."""

  def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout: float = 60.0,
               max_retries: int = 2, backoff: float = 2.0):
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
      raise ValueError(f"judge base URL must start with http:// or https:// and name a host, got "
                       f"{_public_url(base_url)!r}")
    if parts.username is not None or parts.password is not None:
      raise ValueError(f"judge base URL {_public_url(base_url)!r} carries user info (user:password@); put the "
                       "credential in AIR_JUDGE_API_KEY instead")
    self._url = base_url.rstrip("/")  # what requests go to (may carry credentials: user info, query)
    self.base_url = _public_url(self._url)  # what identities, results and logs show
    self.model = model
    key = (api_key or "").strip()  # a key read from a file often ends in a newline
    if any(ord(c) < 32 or ord(c) > 255 or c == "\x7f" for c in key):
      raise ValueError("AIR_JUDGE_API_KEY (or OPENAI_API_KEY) holds a control or non-Latin-1 character, which an "
                       "HTTP header cannot carry; set it to the key alone")
    self._api_key = key or None
    self.timeout, self.max_retries, self.backoff = float(timeout), int(max_retries), float(backoff)

  def __repr__(self) -> str:  # never shows the key
    return f"OpenAIChatJudge(base_url={self.base_url!r}, model={self.model!r})"

  @classmethod
  def from_env(cls, model: str | None = None, env: Mapping[str, str] | None = None) -> "OpenAIChatJudge":
    env = os.environ if env is None else env
    try:
      timeout = float(env.get("AIR_JUDGE_TIMEOUT", "60"))
    except ValueError as e:
      raise ValueError(f"AIR_JUDGE_TIMEOUT must be a number of seconds, got {env.get('AIR_JUDGE_TIMEOUT')!r}") from e
    return cls(env.get("AIR_JUDGE_BASE_URL", "https://api.openai.com/v1"),
               model or env.get("AIR_JUDGE_MODEL", "gpt-4-0613"),
               env.get("AIR_JUDGE_API_KEY") or env.get("OPENAI_API_KEY"), timeout=timeout)

  @property
  def identity(self) -> dict[str, Any]:
    return {"kind": "openai_chat", "base_url": self.base_url, "model": self.model}

  def _post(self, body: dict) -> dict:
    headers = {"Content-Type": "application/json"}
    if self._api_key:
      headers["Authorization"] = "Bearer " + self._api_key
    url = urllib.parse.urlsplit(self._url)
    url = url._replace(path=url.path.rstrip("/") + "/chat/completions")  # the query (if any) stays after it
    req = urllib.request.Request(urllib.parse.urlunsplit(url),
                                 data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=self.timeout) as resp:
      return json.loads(resp.read().decode("utf-8"))

  def complete(self, prompt: str, *, temperature: float = 0.0, max_tokens: int | None = None):
    body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                            "temperature": temperature}
    if max_tokens is not None:
      body["max_tokens"] = max_tokens
    last = "no attempt"
    for attempt in range(self.max_retries + 1):
      if attempt:
        time.sleep(self.backoff * attempt)
      try:
        data = self._post(body)
      except urllib.error.HTTPError as e:
        last = f"HTTP {e.code} {e.reason}"
        if e.code in (429, 500, 502, 503, 504):
          continue  # rate limit or server trouble: retry
        hint = "; check AIR_JUDGE_API_KEY" if e.code in (401, 403) else ""
        raise JudgeError(f"{self!r}: {last}{hint}") from None
      except (socket.timeout, TimeoutError) as e:
        last = f"timed out after {self.timeout:g} s ({type(e).__name__})"
        continue
      except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
          last = f"timed out after {self.timeout:g} s"
          continue
        raise JudgeError(f"{self!r}: cannot reach the endpoint ({reason})") from None
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JudgeError(f"{self!r}: the reply is not JSON ({e})") from None
      except (ConnectionError, http.client.HTTPException) as e:  # hung up, reset, cut short: retry
        last = f"connection failed ({type(e).__name__})"
        continue
      try:
        text = data["choices"][0]["message"]["content"]
      except (KeyError, IndexError, TypeError):
        raise JudgeError(f"{self!r}: the reply has no choices[0].message.content (keys: "
                         f"{sorted(data) if isinstance(data, dict) else type(data).__name__})") from None
      if not isinstance(text, str):
        raise JudgeError(f"{self!r}: the reply's content is {type(text).__name__}, not a string")
      return text, {"model": data.get("model") if isinstance(data, dict) else None}
    raise JudgeError(f"{self!r}: {last} ({self.max_retries + 1} attempts)")


class LocalLMJudge(Judge):
  """A local Hugging Face Llama causal LM run by air-jax's decoder (loaded on first use)."""

  def __init__(self, model_dir: str | os.PathLike, *, default_max_tokens: int = 256, dtype: str = "float32"):
    from air_jax.hub import resolve_checkpoint

    self.model_dir = resolve_checkpoint(model_dir, what="judge model")
    if not os.path.isdir(self.model_dir):
      raise FileNotFoundError(f"judge model directory not found: {self.model_dir}")
    self.default_max_tokens, self.dtype = default_max_tokens, dtype
    self._lm = None
    self._identity: dict | None = None

  @property
  def identity(self) -> dict[str, Any]:
    if self._identity is None:
      from eval.manifest import directory_hash

      self._identity = {"kind": "local_hf", "model_dir": os.path.abspath(self.model_dir),
                        "model_sha256": directory_hash(self.model_dir), "dtype": self.dtype,
                        "decoder": "air_jax"}
    return self._identity

  def complete(self, prompt: str, *, temperature: float = 0.0, max_tokens: int | None = None):
    from eval.local_lm import generate_text, load_causal_lm

    if self._lm is None:
      self._lm = load_causal_lm(self.model_dir, self.dtype)
    seed = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)  # sampled retries stay reproducible
    try:
      text = generate_text(self._lm, prompt, max_new_tokens=max_tokens or self.default_max_tokens,
                           temperature=temperature, seed=seed)
    except ValueError as e:
      raise JudgeError(f"local judge {self.model_dir}: {e}") from None
    return text, {"model": self.model_dir}


class CachedJudge:
  """A judge whose every call is cached on disk by (identity, prompt, settings); failures are returned, not raised.

  Args:
    judge: The judge.
    cache_dir: Cache directory (created).
  """

  def __init__(self, judge: Judge, cache_dir: str | os.PathLike):
    self.judge = judge
    self.cache_dir = Path(cache_dir)
    self.calls = 0  # calls that reached the judge (cache misses)

  @property
  def identity(self) -> dict[str, Any]:
    return self.judge.identity

  def key(self, prompt: str, temperature: float, max_tokens: int | None, run: int) -> str:
    # where a local checkpoint lives is not part of what answers: its content hash is
    ident = {k: v for k, v in self.identity.items() if k != "model_dir"}
    src = json.dumps({"v": CACHE_VERSION, "judge": ident, "prompt": prompt, "temperature": temperature,
                      "max_tokens": max_tokens, "run": run}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(src.encode("utf-8")).hexdigest()

  def ask(self, prompt: str, *, temperature: float = 0.0, max_tokens: int | None = None, run: int = 0) -> JudgeReply:
    """The cached answer, else the judge's (stored if it came); a failure is a reply with ``error`` set."""
    k = self.key(prompt, temperature, max_tokens, run)
    path = self.cache_dir / k[:2] / f"{k}.json"
    if path.is_file():
      try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return JudgeReply(text=data["text"], cached=True, info=data.get("info", {}))
      except (OSError, json.JSONDecodeError, KeyError) as e:
        log.warning("ignoring an unreadable judge cache entry %s (%s)", path, e)
    self.calls += 1
    try:
      text, info = self.judge.complete(prompt, temperature=temperature, max_tokens=max_tokens)
    except JudgeError as e:
      log.warning("judge call failed: %s", e)
      return JudgeReply(text=None, error=str(e))
    atomic_write_json(path, {"judge": self.identity, "temperature": temperature, "max_tokens": max_tokens,
                             "run": run, "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
                             "text": text, "info": info}, ensure_ascii=False)
    return JudgeReply(text=text, info=info)


def make_judge(kind: str, *, model: str | None = None, cache_dir: str | os.PathLike) -> CachedJudge:
  """``--judge openai`` (endpoint from the environment; ``model`` overrides AIR_JUDGE_MODEL) or ``--judge local``
  (``model`` is the causal-LM directory), wrapped in a cache."""
  if kind == "openai":
    judge: Judge = OpenAIChatJudge.from_env(model)
  elif kind == "local":
    if not model:
      raise ValueError("--judge local needs --judge-model DIR (a Hugging Face Llama causal-LM directory)")
    judge = LocalLMJudge(model)
  else:
    raise ValueError(f"unknown judge {kind!r}; expected one of {JUDGE_KINDS}")
  return CachedJudge(judge, cache_dir)
