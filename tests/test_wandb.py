"""The optional Weights & Biases writer (config.metrics.wandb_project): a CLI run in offline mode
logs the same scalars as metrics.jsonl to a W&B run in WORKDIR/wandb."""
import glob
import json
import os
import struct

import pytest

from conftest import run_cli
from test_cli import TINY


def _wandb_records(path):
  """The records of a W&B run file (run-ID.wandb), read without the network or wandb's Go
  service: a LevelDB-style log (a 7-byte ":W&B" header, then 32 KiB blocks of records, each
  [crc32 u32][length u16][type u8: 1 whole, 2 first, 3 middle, 4 last piece][data]) of
  wandb_internal_pb2.Record protobufs."""
  from wandb.proto import wandb_internal_pb2
  data = open(path, "rb").read()
  assert data[:4] == b":W&B", data[:8]
  block, pos, piece, out = 32768, 7, b"", []
  while pos + 7 <= len(data):
    if block - pos % block < 7:   # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
    if kind == 0:
      break
    piece += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(piece)
      out.append(record)
      piece = b""
  return out


def test_offline_wandb_run_holds_the_logged_scalars(tmp_path):
  pytest.importorskip("wandb", reason="the optional extra: pip install -e \".[wandb]\"")
  wd = str(tmp_path / "run")
  home = str(tmp_path / "wandb_home")   # wandb's own settings and caches, not the user's
  env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": home,
         "WANDB_CACHE_DIR": home, "WANDB_DATA_DIR": home}
  r = run_cli([*TINY, f"--workdir={wd}", "--config.train.steps=2", "--config.train.log_every=1",
               "--config.checkpoint.every_steps=0", "--config.metrics.wandb_project=jaxsae-test"],
              env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  files = glob.glob(os.path.join(wd, "wandb", "offline-run-*", "run-*.wandb"))
  assert len(files) == 1, os.listdir(wd)
  records = _wandb_records(files[0])
  run = next(rec.run for rec in records if rec.WhichOneof("record_type") == "run")
  assert run.project == "jaxsae-test" and run.display_name == "run"
  # A key holding "/" is stored split at it ("train/fvu": nested_key ["train", "fvu"]).
  logged = [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in rec.history.item}
            for rec in records if rec.WhichOneof("record_type") == "history"]
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    written = [json.loads(line) for line in f]
  assert [h["_step"] for h in logged] == [rec["step"] for rec in written] == [1, 2]
  for h, rec in zip(logged, written):
    scalars = {k: v for k, v in rec.items() if k != "step"}
    assert scalars.keys() <= h.keys(), scalars.keys() - h.keys()
    for key, value in scalars.items():
      assert h[key] == pytest.approx(value, rel=1e-6), key
  assert "eval/fvu" in logged[-1]


def test_a_missing_wandb_is_refused_before_training(tmp_path):
  """metrics.wandb_project without wandb installed: refused before anything is written, naming
  the field and the extra to install. (The CLI with `wandb` made unimportable, as where the
  extra is not installed.)"""
  import subprocess
  import sys
  from conftest import REPO
  wd = str(tmp_path / "run")
  hide = ("import runpy, sys; sys.modules['wandb'] = None; sys.argv[0] = 'jaxsae.main'; "
          "runpy.run_module('jaxsae.main', run_name='__main__')")
  r = subprocess.run([sys.executable, "-c", hide, *TINY, f"--workdir={wd}",
                      "--config.metrics.wandb_project=p"], cwd=REPO, capture_output=True,
                     text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 1 and not os.path.exists(wd), r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == (
      "  metrics.wandb_project='p' but wandb is not installed: pip install -e \".[wandb]\" (or "
      "leave metrics.wandb_project empty)"), r.stderr[-2000:]
