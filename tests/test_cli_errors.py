"""CLI user errors: exit status 2, the path and the cause named, no traceback; a full disk leaves resumable output."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

from eval import captions_io
from eval.chair import main
from eval.cli import describe_os_error

sys.path.insert(0, str(Path(__file__).parent))
from test_chair_cli import args, gt_captioner  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_out_is_a_file(tmp_path, capsys):
  out = tmp_path / "results"
  out.write_text("x")
  assert main(args(out, n=3), gt_captioner) == 2
  err = capsys.readouterr().err
  assert str(out) in err and "is a file" in err and "Traceback" not in err


def test_disk_full_is_exit_2_and_resumable(tmp_path, capsys, monkeypatch):
  real_write = captions_io.CaptionsWriter.write
  calls = {"n": 0}

  def full_disk(self, *a, **k):
    calls["n"] += 1
    if calls["n"] == 3:
      raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "greedy_captions.jsonl"))
    return real_write(self, *a, **k)

  monkeypatch.setattr(captions_io.CaptionsWriter, "write", full_disk)
  assert main(args(tmp_path, "--batch-size", "1", n=6), gt_captioner) == 2
  err = capsys.readouterr().err
  assert "greedy_captions.jsonl" in err and "No space left" in err and "rerun" in err
  kept = captions_io.read_jsonl_records(tmp_path / "greedy_captions.jsonl")
  assert len(kept) == 2
  monkeypatch.setattr(captions_io.CaptionsWriter, "write", real_write)
  assert main(args(tmp_path, "--batch-size", "1", n=6), gt_captioner) == 0
  assert len(captions_io.read_jsonl_records(tmp_path / "greedy_captions.jsonl")) == 6


def test_describe_os_error_names_path_and_hint():
  msg = describe_os_error(OSError(errno.EROFS, "Read-only file system", "/ro/x.json"))
  assert msg.startswith("/ro/x.json: Read-only file system") and "--out" in msg


def test_cli_subprocess_has_no_traceback(tmp_path):
  out = tmp_path / "f"
  out.write_text("")
  proc = subprocess.run([sys.executable, "-m", "eval.attribute", "--chair-json", str(tmp_path / "none.json"),
                         "--coco-root", str(tmp_path), "--model", str(ROOT / "organism" / "checkpoint"),
                         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr and str(out) in proc.stderr


def test_out_of_range_heads_fail_before_any_caption(tmp_path, capsys):
  import json

  heads = tmp_path / "heads.json"
  heads.write_text(json.dumps({"hal_heads": [[50, 0]], "non_hal_heads": []}))
  out = tmp_path / "out"
  assert main(args(out, "--model", str(ROOT / "organism" / "checkpoint"), "--method", "greedy,air",
                   "--heads", str(heads), n=2)) == 2
  err = capsys.readouterr().err
  assert "[50, 0]" in err and "outside the model" in err and f"(from --heads {heads})" in err  # the file named
  assert not (out / "greedy_captions.jsonl").exists()  # greedy did not caption first


def test_missing_annotations_list_fails_before_any_caption(tmp_path, capsys):
  import json
  import shutil

  from test_chair_cli import FIXTURE

  root = tmp_path / "coco"
  shutil.copytree(FIXTURE, root)
  inst = root / "annotations" / "instances_val2014.json"
  data = json.loads(inst.read_text())
  del data["annotations"]
  inst.write_text(json.dumps(data))
  calls = []

  def factory(method):
    def captioner(images, names):
      calls.append(len(images))
      return ["a cat"] * len(images)
    return captioner

  out = tmp_path / "out"
  rc = main(["--coco-root", str(root), "--num-images", "3", "--out", str(out), "--no-progress"], factory)
  assert rc == 2 and calls == []
  assert "instances_val2014.json" in capsys.readouterr().err


def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys):
  """Another process writing to --out holds its lock: this run stops before any work, naming the holder; once the
  holder is gone the run proceeds (no stale lock), and the run's own lock is released when it ends."""
  from eval import cli

  out = tmp_path / "out"
  out.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from eval.cli import lock_output_dir; "
                             f"lock_output_dir({str(out)!r}); print('locked', flush=True); time.sleep(60)"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    assert main(args(out, n=3), gt_captioner) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is in use by another run (pid {holder.pid})" in err and "Traceback" not in err
    assert not (out / "greedy_captions.jsonl").exists()
  finally:
    holder.kill()
    holder.wait()
  assert main(args(out, n=3), gt_captioner) == 0
  assert not cli._LOCKS  # released at the end of the run


def test_lock_is_released_by_run_and_works_on_a_foreign_lock_file(tmp_path, monkeypatch):
  """A CLI's run() called directly (eval.rerun, tests) releases its lock when it returns; a lock file left by
  another user's finished run (not writable here) is locked read-only instead of failing the run."""
  import os

  from eval import chair, cli

  out = tmp_path / "out"
  chair.run(args(out, n=3), gt_captioner)
  assert not cli._LOCKS
  real_open = os.open

  def foreign(path, flags, *a):
    if str(path).endswith(cli.LOCK_FILE) and flags & os.O_RDWR:
      raise PermissionError(13, "Permission denied", str(path))
    return real_open(path, flags, *a)

  monkeypatch.setattr(os, "open", foreign)
  cli.lock_output_dir(out)
  assert len(cli._LOCKS) == 1
  holder = subprocess.run([sys.executable, "-c", "from eval.cli import lock_output_dir; "
                           f"lock_output_dir({str(out)!r})"], cwd=ROOT, capture_output=True, text=True)
  assert holder.returncode != 0 and "in use by another run" in holder.stderr  # the read-only lock still excludes
  cli.release_output_locks()
