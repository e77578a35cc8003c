"""`jaxsae.evaluate` on a tiny random Llama: figures checked against limits and against a plain
forward with a hook written here, the same SAE through every format, and the refusals.

Everything runs for real: the model (built by test_dump's fixture), the SAEs (written here in
SAELens's layout, or trained by jaxsae on a store dumped from the same model and exported).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import REPO, run_cli
from test_dump import tiny_llama, write_texts  # noqa: F401  (tiny_llama is a fixture)

pytest.importorskip("torch")
pytest.importorskip("transformers")
import torch  # noqa: E402
import transformers  # noqa: E402

from jaxsae import evaluate as ev, export as export_lib  # noqa: E402
from jaxsae.evaluate import EvaluateError  # noqa: E402
from jaxsae.data import lm  # noqa: E402

D, LAYER, HOOK, T, B = 32, 1, "model.layers.1", 16, 4
FIGURES = ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "loss_recovered", "delta_loss", "kl",
           "fvu", "l0", "dead_frac", "dense_frac", "tokens")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("texts"))
  write_texts(folder, n=2, lines=12)
  return f"{folder}/*.txt"


def write_saelens(folder, w_enc, b_enc, w_dec, b_dec, k, model, hook=HOOK):
  """An SAE in SAELens's folder layout (cfg.json + sae_weights.safetensors), float32."""
  os.makedirs(folder, exist_ok=True)
  save_file({"W_enc": np.asarray(w_enc, np.float32), "b_enc": np.asarray(b_enc, np.float32),
             "W_dec": np.asarray(w_dec, np.float32), "b_dec": np.asarray(b_dec, np.float32)},
            os.path.join(folder, "sae_weights.safetensors"))
  with open(os.path.join(folder, "cfg.json"), "w") as f:
    json.dump({"architecture": "topk", "d_in": w_enc.shape[0], "d_sae": w_enc.shape[1], "k": k,
               "apply_b_dec_to_input": True, "normalize_activations": "none",
               "metadata": {"model_name": model, "hook_name": hook}}, f)
  return folder


def random_sae(folder, model, n=64, k=4, seed=0, d=D, hook=HOOK):
  rng = np.random.default_rng(seed)
  w_dec = rng.standard_normal((n, d)) / np.sqrt(d)
  return write_saelens(folder, w_dec.T * 2, rng.standard_normal(n) * 0.1, w_dec,
                       rng.standard_normal(d) * 0.1, k, model, hook)


def run(sae, model, texts, **kw):
  return ev.evaluate(sae, model, LAYER, texts, seq_len=T, batch_size=B, **kw)


# ---- limits -------------------------------------------------------------------------------------

def test_exact_and_zero_saes_hit_the_limits(tiny_llama, texts, tmp_path):
  # n = 2d, W_enc = [I, -I], k = d: z = (relu(x), relu(-x)), and W_dec = [I; -I] rebuilds x.
  eye = np.eye(D)
  exact = write_saelens(str(tmp_path / "exact"), np.hstack([eye, -eye]), np.zeros(2 * D),
                        np.vstack([eye, -eye]), np.zeros(D), D, tiny_llama)
  r = run(exact, tiny_llama, texts)
  assert r["tokens"] > 0 and r["ce_clean"] > 0
  assert r["ce_spliced"] == pytest.approx(r["ce_clean"], abs=1e-5)
  assert r["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
  assert abs(r["delta_loss"]) < 1e-5 and abs(r["kl"]) < 1e-6 and r["fvu"] < 1e-10
  assert r["ce_zero"] != r["ce_clean"]   # a random model: zeros need not hurt it, but change it

  zero = write_saelens(str(tmp_path / "zero"), np.zeros((D, 8)), np.zeros(8), np.zeros((8, D)),
                       np.zeros(D), 2, tiny_llama)
  z = run(zero, tiny_llama, texts)
  assert z["ce_spliced"] == pytest.approx(z["ce_zero"], rel=1e-6)
  assert z["loss_recovered"] == pytest.approx(0.0, abs=1e-5)
  assert (z["l0"], z["dead_frac"], z["ce_clean"]) == (0.0, 1.0, r["ce_clean"])


def test_several_saes_in_one_pass_score_as_each_alone(tiny_llama, texts, tmp_path):
  # evaluate_many shares the clean and ablated runs; each SAE's figures must not depend on the
  # others beside it (a folder and an in-memory SaeWeights alike), and each keeps its own name.
  from jaxsae import sae_io
  a = random_sae(str(tmp_path / "a"), tiny_llama, seed=1)
  b = sae_io.load(random_sae(str(tmp_path / "b"), tiny_llama, n=96, k=6, seed=2))
  both = ev.evaluate_many([a, b], tiny_llama, LAYER, texts, seq_len=T, batch_size=B)
  alone = [run(a, tiny_llama, texts), run(b.path, tiny_llama, texts)]
  assert [r["sae"] for r in both] == [a, b.path] and both[0]["n"] == 64 and both[1]["n"] == 96
  assert both[0]["ce_spliced"] != both[1]["ce_spliced"]
  for r, ref in zip(both, alone):
    for key in FIGURES:
      assert r[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
  with pytest.raises(EvaluateError, match="no SAE"):
    ev.evaluate_many([], tiny_llama, LAYER, texts)


# ---- an independent computation ---------------------------------------------------------------

def file_sae(sae_dir):
  """(codes, reconstruction) of rows, straight from a SAELens-layout folder's tensors."""
  from safetensors.numpy import load_file
  w = {k: torch.from_numpy(v) for k, v in load_file(f"{sae_dir}/sae_weights.safetensors").items()}
  k = json.load(open(f"{sae_dir}/cfg.json"))["k"]

  def sae(x):
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    vals, idx = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    return z, z @ w["W_dec"] + w["b_dec"]
  return sae


def reference(model_path, texts, sae, massive_ratio=None):
  """Every figure from a plain HF forward and a hook on model.layers[1] written here; sae(x) gives
  the codes and reconstruction of rows x [..., d]."""
  tok = transformers.AutoTokenizer.from_pretrained(model_path)
  model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
  files = sorted(__import__("glob").glob(texts))
  stream = []
  for i, path in enumerate(files):
    stream += ([tok.eos_token_id] if i else []) + tok(open(path).read(),
                                                      add_special_tokens=False)["input_ids"]
  windows = torch.tensor(stream[:len(stream) // T * T]).reshape(-1, T)
  state = {}

  def hook(module, args, output):
    h = output[0] if isinstance(output, tuple) else output
    state["h"] = h.detach().clone()
    if "new" in state:
      h = state["new"]
    return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

  model.model.layers[1].register_forward_hook(hook)
  batches = windows.split(B)

  def forward(ids, new=None):
    state.pop("new", None)
    if new is not None:
      state["new"] = new
    with torch.no_grad():
      return model(input_ids=ids).logits.double()

  def masked(h):   # [b, T] bool: positions spliced (not massive)
    if massive_ratio is None:
      return torch.ones(h.shape[:2], dtype=torch.bool)
    norms = h.reshape(-1, D).norm(dim=1)   # the median as numpy's (torch's is the lower middle)
    return (norms <= massive_ratio * float(np.median(norms.numpy()))).reshape(h.shape[:2])

  acts = []
  for ids in batches:
    forward(ids)
    acts.append(state["h"])
  kept = torch.cat([a[masked(a)] for a in acts])
  mean = kept.double().mean(0).float()
  ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "mean": 0.0}
  kl = err = var = 0.0
  codes = []
  for ids, h in zip(batches, acts):
    keep = masked(h)[..., None]
    with torch.no_grad():
      z, x_hat = sae(h)
    codes.append(z[keep[..., 0]])
    err += float(((h - x_hat) ** 2 * keep).sum())
    var += float(((h - mean) ** 2 * keep).sum())
    logp = {}
    for name, new in (("clean", None), ("spliced", torch.where(keep, x_hat, h)),
                      ("zero", torch.where(keep, 0.0, h)), ("mean", torch.where(keep, mean, h))):
      logp[name] = torch.log_softmax(forward(ids, new)[:, :-1], -1)
      ce[name] -= float(logp[name].gather(-1, ids[:, 1:, None]).sum())
    kl += float((logp["clean"].exp() * (logp["clean"] - logp["spliced"])).sum())
  preds = windows.shape[0] * (T - 1)
  ce = {name: v / preds for name, v in ce.items()}
  fired = (torch.cat(codes) > 0).double()
  freq = fired.mean(0)
  return {"ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero": ce["zero"],
          "ce_mean": ce["mean"], "kl": kl / preds, "fvu": err / var,
          "loss_recovered": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"]),
          "delta_loss": ce["spliced"] - ce["clean"], "l0": float(fired.sum(1).mean()),
          "dead_frac": float((freq == 0).double().mean()),
          "dense_frac": float((freq > 0.1).double().mean()), "tokens": windows.numel(),
          "sae_rows": len(kept)}


@pytest.mark.parametrize("massive_ratio", [None, 1.1])
def test_figures_match_a_plain_forward_with_a_hook(tiny_llama, texts, tmp_path, massive_ratio):
  sae = random_sae(str(tmp_path / "sae"), tiny_llama)
  got = run(sae, tiny_llama, texts, filter_massive=massive_ratio is not None,
            massive_ratio=massive_ratio)
  want = reference(tiny_llama, texts, file_sae(sae), massive_ratio)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
  if massive_ratio:   # a low ratio, so that a share of the positions is left clean
    assert 0 < got["massive_rows"] < got["tokens"] // 2
  assert got["massive_rows"] + got["sae_rows"] == got["tokens"]
  assert got["kl"] > 0 and got["ce_spliced"] != got["ce_clean"]
  hist = got["freq_hist"]
  assert sum(hist["counts"]) + hist["dead"] == 64 and len(hist["log10_edges"]) == \
      len(hist["counts"]) + 1


def test_a_jumprelu_sae_matches_a_plain_forward_with_a_hook(tiny_llama, texts, tmp_path):
  """A SAELens "jumprelu" folder (what a jaxsae BatchTopK run exports): every latent whose
  pre-activation passes its threshold, rows holding different numbers of them."""
  rng = np.random.default_rng(4)
  n = 64
  w_dec = rng.standard_normal((n, D)) / np.sqrt(D)
  w_enc, b_enc, b_dec = w_dec.T * 2, rng.standard_normal(n) * 0.1, rng.standard_normal(D) * 0.1
  threshold = rng.uniform(0.0, 0.2, n).astype(np.float32)
  folder = write_saelens(str(tmp_path / "jump"), w_enc, b_enc, w_dec, b_dec, 4, tiny_llama)
  cfg = json.load(open(f"{folder}/cfg.json"))
  cfg["architecture"] = "jumprelu"
  del cfg["k"]
  json.dump(cfg, open(f"{folder}/cfg.json", "w"))
  from safetensors.numpy import load_file
  tensors = load_file(f"{folder}/sae_weights.safetensors")
  save_file({**tensors, "threshold": threshold}, f"{folder}/sae_weights.safetensors")
  w = {k: torch.from_numpy(v) for k, v in load_file(f"{folder}/sae_weights.safetensors").items()}

  def jump(x):
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    z = pre.relu() * (pre > w["threshold"])
    return z, z @ w["W_dec"] + w["b_dec"]

  got = run(folder, tiny_llama, texts)
  want = reference(tiny_llama, texts, jump, 10.0)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
  assert got["k"] == 0 and 0 < got["l0"] and got["sae_kind"] == "saelens"


def test_saes_saved_by_sae_lens_and_sparsify(tiny_llama, texts, tmp_path):
  """Peers' own files, scored against their own encode and decode inside the reference hook."""
  sae_lens = pytest.importorskip("sae_lens")
  sparsify = pytest.importorskip("sparsify")
  torch.manual_seed(3)
  # SAELens: decoder norms not 1 and rescaled by, b_dec not subtracted from the input: both are
  # folded into the weights by the loader.
  cfg = sae_lens.TopKSAEConfig(d_in=D, d_sae=64, k=4, rescale_acts_by_decoder_norm=True,
                               apply_b_dec_to_input=False)
  cfg.metadata.model_name, cfg.metadata.hook_name = os.path.basename(tiny_llama), \
      "blocks.1.hook_resid_post"
  lens = sae_lens.TopKSAE(cfg)
  with torch.no_grad():
    for p in (lens.W_enc, lens.W_dec, lens.b_enc, lens.b_dec):
      p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 1.0))
  lens.save_model(str(tmp_path / "lens"))
  # sparsify: its trainer saves each SAE in a folder named after its hook point.
  coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=64, k=4), device="cpu",
                               dtype=torch.float32)
  with torch.no_grad():
    coder.encoder.bias.copy_(torch.randn(64) * 0.3)
    coder.b_dec.copy_(torch.randn(D) * 0.3)
  coder.save_to_disk(str(tmp_path / "layers.1"))

  def coder_fn(x):
    rows = x.reshape(-1, D)
    out = coder.encode(rows)
    z = torch.zeros(len(rows), 64).scatter(-1, out.top_indices, out.top_acts)
    return z.reshape(*x.shape[:-1], 64), coder.decode(out.top_acts, out.top_indices).reshape(x.shape)

  for path, fn in ((tmp_path / "lens", lambda x: (lens.encode(x), lens(x))),
                   (tmp_path / "layers.1", coder_fn)):
    got = run(str(path), tiny_llama, texts)
    want = reference(tiny_llama, texts, fn, 10.0)
    for key, value in want.items():
      assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (path, key)
    assert got["sae_kind"] == ("saelens" if path.name == "lens" else "sparsify")


# ---- the same SAE through a workdir and its three exports -----------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_llama, texts, tmp_path_factory):
  """(paths of a jaxsae run trained on a store dumped from the tiny Llama's block 1 and of its
  exports, that store)."""
  root = tmp_path_factory.mktemp("trained")
  store = str(root / "store")
  r = subprocess.run([sys.executable, "-m", "jaxsae.dump", f"--model={tiny_llama}",
                      f"--layer={LAYER}", f"--text={texts}", f"--out={store}", f"--seq_len={T}",
                      "--dtype=float32", "--chunk_rows=64", "--shard_rows=256",
                      "--progress=false"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  wd = str(root / "run")
  r = run_cli(["--config=configs/quickstart.py", f"--workdir={wd}", "--config.data.source=store",
               f"--config.data.path={store}", f"--config.sae.d={D}", "--config.sae.n=64",
               "--config.sae.k=4", "--config.train.batch_size=64", "--config.train.steps=2",
               "--config.train.init_rows=128", "--config.data.eval_rows=64",
               "--config.train.log_every=1", "--config.data.normalize=unit"])
  assert r.returncode == 0, r.stderr[-3000:]
  paths = {"workdir": wd}
  for fmt, out in (("saelens", root / "saelens"), ("sparsify", root / "sparsify"),
                   ("npz", root / "sae.npz")):
    export_lib.export(wd, fmt, str(out))
    paths[fmt] = str(out)
  return paths, store


def test_a_workdir_and_its_three_exports_score_the_same(tiny_llama, texts, trained):
  results = {kind: run(path, tiny_llama, texts) for kind, path in trained[0].items()}
  base = results["workdir"]
  assert base["sae_kind"] == "jaxsae workdir" and base["sae_step"] == 2
  assert base["hook"] == HOOK and abs(base["input_scale"] - 1) > 0.05   # folding is exercised
  for kind, r in results.items():
    for key in FIGURES:
      assert r[key] == pytest.approx(base[key], rel=1e-6, abs=1e-9), (kind, key)


def test_command_line_table_and_json(tiny_llama, texts, trained, tmp_path):
  out = tmp_path / "eval.json"
  r = subprocess.run([sys.executable, "-m", "jaxsae.evaluate", f"--sae={trained[0]['saelens']}",
                      f"--model={tiny_llama}", f"--layer={LAYER}", f"--text={texts}",
                      "--tokens=100", f"--seq_len={T}", f"--batch_size={B}", "--progress=false",
                      f"--json={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "loss recovered" in r.stdout and "KL(clean||spliced)" in r.stdout
  assert "massive" in r.stdout
  got = json.loads(out.read_text())
  assert set(FIGURES) | {"model", "layer", "sae", "jaxsae_version", "freq_hist"} <= got.keys()
  assert got["tokens"] == 112 and got["windows"] == 7   # 100 rounded up to whole windows
  assert (got["model"], got["layer"], got["sae"]) == (tiny_llama, LAYER, trained[0]["saelens"])


# ---- refusals -----------------------------------------------------------------------------------

def test_mismatched_saes_are_refused_before_the_model_runs(tiny_llama, texts, tmp_path,
                                                           monkeypatch):
  forwards = []
  real = lm.BlockOutput._forward
  monkeypatch.setattr(lm.BlockOutput, "_forward",
                      lambda self, *a: forwards.append(1) or real(self, *a))
  cases = {
      "d": (random_sae(str(tmp_path / "d"), tiny_llama, d=16), "d=16", "d=32"),
      "hook": (random_sae(str(tmp_path / "hook"), tiny_llama, hook="model.layers.2"),
               "'model.layers.2'", "'model.layers.1'"),
      "tl_hook": (random_sae(str(tmp_path / "tl"), tiny_llama, hook="blocks.0.hook_resid_post"),
                  "blocks.0.hook_resid_post", "'model.layers.1'"),
      "model": (random_sae(str(tmp_path / "m"), "/elsewhere/gpt2"), "'/elsewhere/gpt2'",
                tiny_llama),
  }
  for name, (sae, *needles) in cases.items():
    with pytest.raises(EvaluateError) as e:
      run(sae, tiny_llama, texts)
    assert all(n in str(e.value) for n in needles), (name, str(e.value))
  assert not forwards
  # The same hook point under its other names is accepted: TransformerLens's, sparsify's.
  for hook in ("blocks.1.hook_resid_post", "layers.1"):
    assert run(random_sae(str(tmp_path / hook), os.path.basename(tiny_llama), hook=hook),
               tiny_llama, texts, tokens=T)["tokens"] == T


def test_bad_inputs_get_one_line_errors(tiny_llama, texts, tmp_path):
  from jaxsae.data.source import DataError
  from jaxsae.sae_io import SaeError
  sae = random_sae(str(tmp_path / "sae"), tiny_llama)
  (tmp_path / "empty.txt").write_text("")
  cases = [(EvaluateError, "holds fewer than --seq_len=16 tokens: not one window",
            dict(sae_path=sae, model=tiny_llama, text=str(tmp_path / "empty.txt"))),
           (DataError, "no such folder or .gguf file",
            dict(sae_path=sae, model=str(tmp_path / "nomodel"), text=texts)),
           (DataError, "names no files",
            dict(sae_path=sae, model=tiny_llama, text=str(tmp_path / "none*.txt"))),
           (SaeError, f"{tmp_path / 'nope'}: no such file or folder",
            dict(sae_path=str(tmp_path / "nope"), model=tiny_llama, text=texts))]
  for error, needle, kw in cases:
    with pytest.raises(error) as e:
      ev.evaluate(layer=LAYER, seq_len=T, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)
  # On the command line: one line on stderr, exit status 1.
  r = subprocess.run([sys.executable, "-m", "jaxsae.evaluate", f"--sae={tmp_path / 'nope'}",
                      f"--model={tiny_llama}", f"--layer={LAYER}", f"--text={texts}"],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and r.stderr.strip() == \
      f"jaxsae.evaluate: error: {tmp_path / 'nope'}: no such file or folder", r.stderr[-2000:]


# ---- the quality benchmark's scores inside the model --------------------------------------------

def test_quality_bench_scores_every_trainer_inside_the_model(tiny_llama, texts, trained, tmp_path):
  """bench/quality.py --lm_text on a store dumped from the tiny Llama: every trainer's SAE is
  spliced in by evaluate_many (the peers' through their own save formats), the clean and ablated
  losses are shared, and a row trained before without these figures is retrained, not skipped."""
  import importlib.util
  trainers = ["jaxsae"] + [t for t, lib in (("sparsify", "sparsify"),
                                             ("dictlearn", "dictionary_learning"),
                                             ("saelens", "sae_lens"))
                           if importlib.util.find_spec(lib)]
  out = tmp_path / "q.jsonl"
  cmd = [sys.executable, "bench/quality.py", "--datasets=tiny", f"--stores=tiny={trained[1]}",
         "--n=64", "--steps=3", "--lrs=1e-3", f"--trainers={','.join(trainers)}",
         "--eval_rows=64", f"--out={out}", f"--table={tmp_path / 'q.md'}",
         "--set=train.batch_size=64,train.init_rows=128,sae.k=4,sae.dead_tokens=128"]
  lm = [f"--lm_text={texts}", "--lm_tokens=64", "--lm_batch_size=2"]
  for args in ([], lm, lm):   # without, with (retrains), with again (nothing left to do)
    r = subprocess.run(cmd + args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in open(out)]
  assert len(rows) == 2 * len(trainers)
  scored = rows[len(trainers):]
  assert sorted(r["trainer"] for r in scored) == sorted(trainers)
  for r in scored:
    assert r["lm_tokens"] == 64 and 0 < r["lm_fvu"] < 2 and r["lm_kl"] > 0, r["trainer"]
    assert r["lm_loss_recovered"] == pytest.approx(
        (r["lm_ce_zero"] - r["lm_ce_spliced"]) / (r["lm_ce_zero"] - r["lm_ce_clean"]))
    for key in ("lm_ce_clean", "lm_ce_zero", "lm_ce_mean"):
      assert r[key] == scored[0][key]
  table = (tmp_path / "q.md").read_text()
  assert table.count("| tiny | 64 |") >= len(trainers) and "Inside the model" in table
