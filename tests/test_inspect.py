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


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """A store of 4096 random rows with token ids, and a tokenizer of WORDS."""
  root = tmp_path_factory.mktemp("store")
  rows = 4096
  x = np.random.default_rng(3).normal(size=(rows, 32)).astype(np.float32)
  tokens = (np.arange(rows) * 7 % len(WORDS)).astype(np.int32)
  np.save(root / "acts.npy", x)
  np.save(root / "tokens.npy", tokens)
  path = str(root / "store")
  r = run_module("jaxsae.dump", f"--from-npy={root / 'acts.npy'}",
                 f"--tokens-npy={root / 'tokens.npy'}", f"--out={path}", "--progress=false")
  assert r.returncode == 0, r.stderr[-3000:]
  return path, x, tokens, _tokenizer(root / "tok.json")


def _codes(export, x):
  """The export's codes of x, encoded independently of jaxsae: SAELens top-k, then ReLU."""
  t = load_file(os.path.join(export, "sae_weights.safetensors"))
  pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
  kth = np.sort(pre, axis=1)[:, -4][:, None]
  return np.where(pre >= kth, np.maximum(pre, 0), 0)


def _listed(stdout, latent):
  """[(activation, row, token)] listed under a latent's heading."""
  block = stdout.split(f"latent {latent}")[1].split("latent ")[0]
  return [(float(v), int(row), tok) for v, row, tok in
          re.findall(r"^\s+(\S+)\s+row\s+(\d+)\s+.*\[\[(.*?)\]\]", block, re.M)]


def test_top_activating_contexts(run, store, tmp_path):
  """Lists each latent's top rows with the values an independent encode of the export gives."""
  root, wd, export = run
  path, x, tokens, tokenizer = store
  html = tmp_path / "top.html"
  r = run_module("jaxsae.inspect", wd, f"--store={path}", "--latents=3,17", "--top=4",
                 f"--tokenizer={tokenizer}", f"--html={html}")
  assert r.returncode == 0, r.stderr[-3000:]

  z = _codes(export, x)
  for latent in (3, 17):
    got = _listed(r.stdout, f"{latent}:")
    want_rows = np.argsort(-z[:, latent], kind="stable")[:4]
    assert [row for _, row, _ in got] == want_rows.tolist(), (latent, got)
    np.testing.assert_allclose([v for v, _, _ in got], z[want_rows, latent], rtol=1e-3, atol=1e-3)
    assert [tok for _, _, tok in got] == [WORDS[tokens[row]] for row in want_rows]
    freq = 100 * np.count_nonzero(z[:, latent]) / len(x)
    assert f"latent {latent}: fires on {freq:.3g}% of 4,096 rows; 4 top activations" in r.stdout
  page = html.read_text()
  assert "<mark>" in page and "latent 17" in page


def test_without_latents_shows_the_most_frequent_and_random_live_ones(run, store):
  """No --latents: the 3 most often firing latents and 2 random live ones, each with its firing
  frequency and contexts; the same seed draws the same latents, another seed others."""
  _, wd, export = run
  path, x, _, tokenizer = store
  args = [wd, f"--store={path}", "--top=2", "--frequent=3", "--random=2",
          f"--tokenizer={tokenizer}"]
  r = run_module("jaxsae.inspect", *args)
  assert r.returncode == 0, r.stderr[-3000:]
  z = _codes(export, x)
  counts = np.count_nonzero(z, axis=0)
  headings = re.findall(r"^latent (\d+) \((most frequent|random)\): fires on (\S+)% of 4,096 "
                        r"rows; 2 top activations$", r.stdout, re.M)
  frequent = [int(j) for j, why, _ in headings if why == "most frequent"]
  drawn = [int(j) for j, why, _ in headings if why == "random"]
  assert frequent == np.argsort(-counts, kind="stable")[:3].tolist(), r.stdout
  assert len(drawn) == 2 and not set(drawn) & set(frequent)
  assert all(counts[j] > 0 for j in drawn)   # live: they have contexts to show
  for j, _, pct in headings:
    assert float(pct) == pytest.approx(100 * counts[int(j)] / len(x), rel=1e-2)
    assert len(_listed(r.stdout, f"{j} (")) == 2
  again = run_module("jaxsae.inspect", *args)
  assert again.stdout == r.stdout   # reproducible
  other = run_module("jaxsae.inspect", *args, "--seed=1")
  assert other.returncode == 0, other.stderr[-3000:]
  assert re.findall(r"^latent (\d+) \(random\)", other.stdout, re.M) != [str(j) for j in drawn]
