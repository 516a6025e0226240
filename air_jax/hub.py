"""Checkpoints named by Hugging Face repository id, resolved to a local snapshot directory.

Everywhere a checkpoint directory is accepted (`load_pretrained`, `plan`, the eval CLIs' `--model`, the base LLM
of the analyses, the HALC detector, a local judge LM), a repository id such as ``llava-hf/llava-1.5-7b-hf`` (or
``org/name@revision``: a branch, tag or commit) works too. An existing local path always wins.

The id is resolved through `huggingface_hub.snapshot_download` with the usual cache (``HF_HUB_CACHE`` / ``HF_HOME``)
and offline switch (``HF_HUB_OFFLINE=1``): a cached snapshot is used as it is when offline or when the hub cannot
be reached; online, the missing files are downloaded. Only files air-jax reads are fetched: safetensors weights,
JSON configs, tokenizer and chat-template files. Pickle-format weights (``*.bin``, ``*.pt``, ...) and repository
code (``*.py``) are never downloaded, so nothing is unpickled and no remote code runs. A snapshot directory
recorded on another machine (``.../models--org--name/snapshots/<commit>``) resolves to the same commit here.
"""

from __future__ import annotations

import os
import re

# Everything the loaders read: configs (config.json, the safetensors index, processor / tokenizer / generation
# configs, chat_template.json), safetensors weights, tokenizer vocabularies (sentencepiece, BPE merges, WordPiece
# vocab.txt of InstructBLIP's Q-Former tokenizer) and Jinja chat templates. "*" also matches "/" (subfolders).
WEIGHT_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
CONFIG_PATTERNS = ("*.json",)

# org/name, each part as the hub allows ([A-Za-z0-9._-], not starting with '.' or '-'), optionally @revision.
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[^\s@]+))?$")
# A snapshot directory of a Hugging Face cache, as results and manifests record it:
# .../models--org--name/snapshots/<commit>
_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<org>[A-Za-z0-9][A-Za-z0-9._-]*?)--(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)"
                       r"/snapshots/(?P<rev>[0-9a-f]{40})/?$")


class CheckpointNotFoundError(FileNotFoundError):
  """A checkpoint given by path or repository id that is neither a local path nor obtainable from the hub."""


def parse_repo_id(name: str) -> tuple[str, str | None] | None:
  """(repo id, revision or None) when `name` reads as ``org/name[@revision]`` or is the path of a Hugging Face
  cache snapshot (``.../models--org--name/snapshots/<commit>``, as results record it), else None."""
  m = _REPO_ID.match(name)
  if m:
    return m.group("repo"), m.group("rev")
  m = _SNAPSHOT.search(name.replace("\\", "/"))  # a path recorded on Windows too
  return (f"{m.group('org')}/{m.group('name')}", m.group("rev")) if m else None


def _offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _cache_dir() -> str:
  """The hub cache huggingface_hub uses, read at call time (it reads its environment once, at import):
  HF_HUB_CACHE, else the legacy HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub
  (default ~/.cache/huggingface/hub)."""
  env = os.environ
  path = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
  if not path:
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"),
                                              "huggingface")
    path = os.path.join(home, "hub")
  return os.path.expandvars(os.path.expanduser(path))


def resolve_checkpoint(path: str | os.PathLike, *, config_only: bool = False,
                       local_files_only: bool | None = None, what: str = "checkpoint") -> str:
  """The local directory of a checkpoint given as a path or as a Hugging Face repository id.

  Args:
    path: a local file or directory (returned unchanged, even if it does not exist and is no repository id, so
      that the caller's own error names it), or ``org/name`` / ``org/name@revision``. A snapshot path of another
      machine's cache (``.../models--org--name/snapshots/<commit>``, as a manifest records it) that does not exist
      here is resolved as ``org/name@<commit>``, so reruns find the same weights.
    config_only: fetch only the JSON configs (enough for `air_jax.plan` and config checks).
    local_files_only: use the local cache only; default: ``HF_HUB_OFFLINE``.
    what: the name used in error messages (e.g. "--model", "HALCConfig.detector_path").

  Returns:
    The snapshot directory (``.../models--org--name/snapshots/<commit>``) or `path` itself.

  Raises:
    CheckpointNotFoundError: a repository id that is not in the cache and cannot be downloaded (offline, unknown,
      gated), naming the id, the cache and what to do.
  """
  path = os.fspath(path)
  parsed = parse_repo_id(path)
  if os.path.exists(path) or parsed is None:
    return path
  repo, revision = parsed
  try:
    from huggingface_hub import snapshot_download
  except ImportError as e:  # transformers depends on it, so this is a broken install
    raise CheckpointNotFoundError(f"{what} {path!r} is not a local path, and huggingface_hub (needed to resolve "
                                  "repository ids) is not installed: pip install huggingface_hub") from e
  offline = _offline() if local_files_only is None else local_files_only
  patterns = list(CONFIG_PATTERNS if config_only else WEIGHT_PATTERNS)
  try:
    # Online, an unreachable hub falls back to a cached snapshot of the revision by itself.
    return snapshot_download(repo, revision=revision, allow_patterns=patterns, cache_dir=_cache_dir(),
                             local_files_only=offline)
  except Exception as e:  # noqa: BLE001 -- hub errors (offline, missing, gated, network) all end the same way
    cache = _cache_dir()
    first = str(e).strip().splitlines()[0].split(". ")[0][:200] if str(e).strip() else ""  # its first sentence
    reason = type(e).__name__ + (f": {first}" if first else "")
    why = "HF_HUB_OFFLINE is set" if local_files_only is None else "local_files_only"
    includes = " ".join(f"--include '{p}'" for p in patterns)  # hf download takes one pattern per --include
    hint = (f"download it where the hub is reachable (`hf download {repo}"
            f"{' --revision ' + revision if revision else ''} {includes}`) into that cache, or pass the "
            "checkpoint directory")
    raise CheckpointNotFoundError(
        f"{what} {path!r} is neither a local path nor a Hugging Face repository available "
        f"{f'in the local cache (offline: {why})' if offline else 'from the hub or the local cache'}"
        f" ({reason}; cache: {cache}); {hint}") from e


__all__ = ["CONFIG_PATTERNS", "CheckpointNotFoundError", "WEIGHT_PATTERNS", "parse_repo_id", "resolve_checkpoint"]
