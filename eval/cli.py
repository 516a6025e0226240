"""What every command-line entry point shares: quiet logging, user errors without tracebacks, where results went.

  sys.exit(run_cli(lambda: body(argv), results_hint=...))

User errors (bad values, missing or unreadable files, a full disk, a read-only output directory) print one line
`error: ...` naming the path and the cause, and exit with status 2; finished work stays on disk (the runs write
incrementally and atomically), so the same command resumes. Programming errors keep their traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Callable

# transformers prints "PyTorch was not found..." advice at import in a torch-free install; it is harmless here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# Loggers whose INFO lines are noise for a user (JAX's "Unable to initialize backend 'tpu'", absl, HTTP).
_NOISY = ("jax", "jax._src.xla_bridge", "absl", "transformers", "urllib3", "httpx", "filelock", "orbax")


class UserError(RuntimeError):
  """An error caused by the command's input: printed without a traceback, exit status 2."""


def setup_logging(level: int = logging.INFO) -> None:
  """INFO for the project's own loggers, WARNING and above for the libraries' (known-harmless notices off)."""
  logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
  for name in _NOISY:
    logging.getLogger(name).setLevel(logging.WARNING)
  try:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
  except ImportError:  # transformers is a dependency, but the CLI should still explain other errors
    pass


def describe_os_error(e: OSError) -> str:
  """`<path>: <cause>` plus what to do, for the file-system errors users meet."""
  path = e.filename if e.filename is not None else ""
  cause = e.strerror or str(e)
  hint = {
      errno.ENOSPC: "free some space and rerun the same command: finished results are kept and the run resumes",
      errno.EDQUOT: "free some space and rerun the same command: finished results are kept and the run resumes",
      errno.EACCES: "choose a writable location (e.g. another --out) or fix the permissions",
      errno.EROFS: "the file system is read-only; choose another --out",
      errno.ENOTDIR: "a path component is a file, not a directory; choose another path",
      errno.EISDIR: "a directory stands where a file was expected; choose another path",
      errno.ENOENT: "check the path",
  }.get(e.errno, "check the path and rerun")
  where = f"{path}: " if path else ""
  return f"{where}{cause} ({hint})"


def run_cli(body: Callable[[], int], user_errors: tuple[type[BaseException], ...] = ()) -> int:
  """Runs `body` (which returns the exit status); user errors become one `error:` line and status 2."""
  setup_logging()
  try:
    return releases_output_locks(body)()  # the output directories this run locked are released when it ends
  except KeyboardInterrupt:
    print("interrupted: finished results are on disk; rerun the same command to resume", file=sys.stderr)
    return 130
  except OSError as e:
    print(f"error: {describe_os_error(e)}", file=sys.stderr)
    return 2
  except (UserError, ValueError, *user_errors) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def check_output_dir(path: str | os.PathLike) -> None:
  """Creates `path` if needed and checks it is a writable directory, before any work starts."""
  path = os.fspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"--out {path} is a file, not a directory; choose another --out")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UserError(f"--out {path}: cannot create the directory: {describe_os_error(e)}") from e
  probe = os.path.join(path, f".write-test.{os.getpid()}")
  try:
    with open(probe, "w") as f:
      f.write("")
    os.unlink(probe)
  except OSError as e:
    raise UserError(f"--out {path} is not writable: {describe_os_error(e)}") from e
  lock_output_dir(path)


LOCK_FILE = ".air_jax.lock"
_LOCKS: dict[str, int] = {}  # real path of an output directory -> descriptor of its held lock file


def lock_output_dir(path: str | os.PathLike) -> None:
  """Holds `<path>/.air_jax.lock` (an advisory `flock`) until the run ends, so that a second run started on the same
  output directory stops with a named error instead of interleaving its records with this run's.

  The lock goes with the process (a killed run leaves no stale lock); a process holding it may take it again.
  Where the file system has no flock (some network mounts) the run proceeds unlocked.
  """
  try:
    import fcntl
  except ImportError:  # not POSIX
    return
  key = os.path.realpath(path)
  if key in _LOCKS:
    return
  lock_file = os.path.join(path, LOCK_FILE)
  try:
    fd, writable = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666), True
  except PermissionError:  # left by another user's finished run: flock works on a read-only descriptor too
    fd, writable = os.open(lock_file, os.O_RDONLY), False
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
    os.close(fd)
    raise UserError(f"--out {os.fspath(path)} is in use by another run ({holder}); wait for it to end, or choose "
                    "another --out") from None
  except OSError as e:  # no flock on this file system
    os.close(fd)
    logging.getLogger("eval").warning("--out %s: cannot lock it (%s); make sure no other run writes there",
                                      os.fspath(path), e.strerror or e)
    return
  if writable:
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}".encode())
  _LOCKS[key] = fd


def release_output_locks(keep: frozenset = frozenset()) -> None:
  """Releases the output-directory locks this process holds, except those in `keep` (real paths)."""
  for key in [k for k in _LOCKS if k not in keep]:
    os.close(_LOCKS.pop(key))  # closing the descriptor releases its flock


def releases_output_locks(run: Callable) -> Callable:
  """Decorates a CLI's `run(argv)`: the output directories it locks are released when it returns, also when it is
  called directly (tests, `eval.rerun`), not only through `run_cli`."""
  import functools

  @functools.wraps(run)
  def wrapper(*args, **kwargs):
    held = frozenset(_LOCKS)
    try:
      return run(*args, **kwargs)
    finally:
      release_output_locks(keep=held)

  return wrapper


def resolve_model_flag(value: str | os.PathLike, flag: str = "--model") -> str:
  """The local checkpoint directory of a model flag: a directory, or a Hugging Face repository id (``org/name``,
  ``org/name@revision``) resolved through the local cache or downloaded (`air_jax.hub`). Errors name the flag."""
  from air_jax.hub import CheckpointNotFoundError, resolve_checkpoint

  try:
    path = resolve_checkpoint(value, what=flag)
  except CheckpointNotFoundError as e:
    raise UserError(str(e)) from e
  if not os.path.isdir(path):
    raise UserError(f"{flag} {os.fspath(value)}: not a directory (nor a Hugging Face repository id org/name)")
  return path


def where_results_are(*paths: str | os.PathLike) -> str:
  """The closing line of a CLI run: where its results (and figures) are."""
  return "results: " + ", ".join(os.fspath(p) for p in paths)
