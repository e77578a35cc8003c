"""`python -m jaxsae.inspect` on a workdir, on an export, and with a store of token ids."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO, run_cli
from test_cli import TINY

WORDS = [f"w{i:02d}" for i in range(50)]


def run_module(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A trained tiny run and its SAELens export."""
  root = tmp_path_factory.mktemp("inspect")
  wd = str(root / "run")
  r = run_cli([*TINY, f"--workdir={wd}", "--config.train.steps=4", "--config.train.log_every=2",
               "--config.checkpoint.every_steps=2"])
  assert r.returncode == 0, r.stderr[-3000:]
  export = str(root / "export")
  r = run_module("jaxsae.export", f"--workdir={wd}", "--format=saelens", f"--out={export}")
  assert r.returncode == 0, r.stderr[-3000:]
  return root, wd, export


def test_summary_of_a_workdir(run):
  _, wd, _ = run
  r = run_module("jaxsae.inspect", wd)
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  assert "d=32 n=128 k=4" in out and "step 4, 512 tokens" in out
  assert re.search(r"dead\s+\d+\.\d+% of latents", out)
  assert "checkpoints 2, 4" in out and "train/fvu" in out and "eval/fvu" in out
  last = json.loads(open(os.path.join(wd, "metrics.jsonl")).readlines()[-1])
  assert f"{last['train/fvu']:.6g}" in out   # the last metrics record


def test_summary_of_an_export(run):
  _, _, export = run
  r = run_module("jaxsae.inspect", export)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "d=32 n=128 k=4" in r.stdout and "step 4, 512 tokens" in r.stdout
  assert "eval/fvu" in r.stdout


def test_not_a_run_is_refused(tmp_path):
  r = run_module("jaxsae.inspect", str(tmp_path))
  assert r.returncode == 1 and "neither a workdir" in r.stderr


def _tokenizer(path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w00"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(path))
  return str(path)


def test_top_activating_contexts(run, tmp_path):
  """Lists each latent's top rows with the values an independent encode of the export gives."""
  root, wd, export = run
  rows = 4096
  x = np.random.default_rng(3).normal(size=(rows, 32)).astype(np.float32)
  tokens = (np.arange(rows) * 7 % len(WORDS)).astype(np.int32)
  np.save(tmp_path / "acts.npy", x)
  np.save(tmp_path / "tokens.npy", tokens)
  store = str(tmp_path / "store")
  r = run_module("jaxsae.dump", f"--from-npy={tmp_path / 'acts.npy'}",
                 f"--tokens-npy={tmp_path / 'tokens.npy'}", f"--out={store}", "--progress=false")
  assert r.returncode == 0, r.stderr[-3000:]

  html = tmp_path / "top.html"
  r = run_module("jaxsae.inspect", wd, f"--store={store}", "--latents=3,17", "--top=4",
                 f"--tokenizer={_tokenizer(tmp_path / 'tok.json')}", f"--html={html}")
  assert r.returncode == 0, r.stderr[-3000:]

  t = load_file(os.path.join(export, "sae_weights.safetensors"))
  pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
  kth = np.sort(pre, axis=1)[:, -4][:, None]
  z = np.where(pre >= kth, np.maximum(pre, 0), 0)        # SAELens top-k, then ReLU
  for latent in (3, 17):
    block = r.stdout.split(f"latent {latent}:")[1].split("latent ")[0]
    got = [(float(v), int(row), tok) for v, row, tok in
           re.findall(r"^\s+(\S+)\s+row\s+(\d+)\s+.*\[\[(.*?)\]\]", block, re.M)]
    want_rows = np.argsort(-z[:, latent], kind="stable")[:4]
    assert [row for _, row, _ in got] == want_rows.tolist(), (latent, got)
    np.testing.assert_allclose([v for v, _, _ in got], z[want_rows, latent], rtol=1e-3, atol=1e-3)
    assert [tok for _, _, tok in got] == [WORDS[tokens[row]] for row in want_rows]
  page = html.read_text()
  assert "<mark>" in page and "latent 17" in page
