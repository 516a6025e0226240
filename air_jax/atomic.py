"""Atomic file writes: write a temp file beside the target, fsync, rename over it. A crash never leaves a torn file."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def clean_stale_temps(path: str | os.PathLike) -> list[str]:
  """Removes temp files that an earlier, killed writer of `path` left behind; returns their paths.

  Temp names carry the writer's pid (`.<name>.<pid>.<random>.tmp`); a temp whose pid no longer runs can only
  be left over from a kill. Temps of live processes (a concurrent writer) are kept.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  prefix = f".{os.path.basename(path)}."
  removed = []
  try:
    names = os.listdir(directory)
  except OSError:
    return removed
  for name in names:
    if not (name.startswith(prefix) and name.endswith(".tmp")):
      continue
    pid = name[len(prefix):].split(".", 1)[0]
    if pid.isdigit() and not _pid_alive(int(pid)):
      try:
        os.unlink(os.path.join(directory, name))
        removed.append(os.path.join(directory, name))
      except OSError:
        pass
  return removed


def atomic_save(path: str | os.PathLike, save: Callable[[str], None]) -> None:
  """Calls `save(tmp_path)` (any writer that takes a path), then renames tmp_path over `path`.

  Temps left by a writer that was killed mid-write are removed first (`clean_stale_temps`).
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  clean_stale_temps(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp", dir=directory)
  os.close(fd)
  try:
    save(tmp)
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the permissions of an ordinary new file
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = False) -> None:
  """Calls `write(f)` on an open temp file (text UTF-8, or binary), then renames it over `path`."""

  def save(tmp: str) -> None:
    with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
      write(f)

  atomic_save(path, save)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike, data: Any, newline: bool = False, **json_kwargs) -> None:
  """json.dump(data, **json_kwargs) atomically; `newline` adds a final newline."""

  def write(f) -> None:
    json.dump(data, f, **json_kwargs)
    if newline:
      f.write("\n")

  atomic_write(path, write)
