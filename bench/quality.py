r"""Quality at equal tokens: jaxsae (full recipe) against SAELens's, sparsify's and
dictionary_learning's top-k SAEs.

  python bench/quality.py                                   # fixture + synthetic, LR sweep
  python bench/quality.py --datasets=fixture,store,synthetic --store=STORE
  python bench/quality.py --datasets=fixture --lrs=2e-4,6e-4,2e-3,6e-3 --trainers=sparsify
  python bench/quality.py --datasets=smollm2-L25 --stores=smollm2-L25=/tmp/jaxsae/datasets/smollm2-L25 \
      --lrs=default,3e-3,6e-3,1.2e-2 --trainers=jaxsae,sparsify   # stores made by bench/make_datasets.sh

--lrs=default trains each trainer alone at its own default learning rate (jaxsae: its automatic
rate; sparsify and dictionary_learning: 2e-4 * sqrt(2^14 / n); SAELens: 3e-4); those rows carry
"lr_choice": "default". The table opens with a summary: per dataset and trainer, the best swept
rate and the default, and the default's FVU over the best's.

For each dataset and learning rate, the --trainers train in lockstep in one process: every batch
comes from jaxsae's own data pipeline (the store loader with its chunk-level held-out split, or the
synthetic source) and the *same array* is handed to jaxsae's compiled step and then to each peer's
step, so all see identical data in identical order, under identical machine load (each trainer's
step time is measured on its own, per step). All have the same n, k, batch, steps, learning rate
and dead-latent rule. Trainers (bench/peers.py):
  jaxsae           the full recipe (below)
  saelens          SAELens's TopKTrainingSAE + SAETrainer on raw inputs (its own default,
                   normalize_activations="none"; rows before 2026-12-04 were on jaxsae-scaled
                   inputs and say so in their variant) (bench/saelens_peer.py)
With --set=sae.architecture=batchtopk or matryoshka_batchtopk (and sae.matryoshka_prefixes),
jaxsae trains that architecture and so do saelens (its BatchTopKTrainingSAE /
MatryoshkaBatchTopKTrainingSAE) and dictlearn (its BatchTopKTrainer / MatryoshkaBatchTopKTrainer);
every one of them is scored as the JumpReLU it is at inference (rows hold k latents on average:
see eval L0), and again at exactly k latents per row on average (one threshold fitted on the
held-out rows, bench/peers.py at_equal_l0: "FVU at L0=k"); sparsify has neither architecture and
is refused.
  sparsify         EleutherAI sparsify's SparseCoder + its Trainer's step with its `adam` option
                   (torch Adam, its linear decay to 0 over the run, no warmup), AuxK alpha =
                   jaxsae's (1/32), raw inputs (bench/sparsify_peer.py)
  sparsify_signum  the same with sparsify's default optimizer, `signum` (SignSGD + schedule-free,
                   momentum 0.95), at --signum_lrs (default "auto": sparsify's own
                   5e-3 * sqrt(2^14 / n)); it runs alone, not in lockstep, since its LR differs
  dictlearn        dictionary_learning's AutoEncoderTopK + TopKTrainer.update as its trainSAE calls
                   it: its Adam, geometric-median b_dec, AuxK (alpha 1/32) and grad clip; jaxsae's
                   warmup and final decay; inputs at its unit mean squared norm where jaxsae
                   normalizes (by jaxsae's estimate), raw where jaxsae does not
                   (bench/dictlearn_peer.py)

Reported per run: held-out FVU (sum ||x - x_hat||^2 / sum ||x - mean||^2 over all held-out rows,
in raw units, the same numpy code for both), held-out L0, dead fraction (latents that did not fire
for `sae.dead_tokens` tokens; SAELens's counters read with the same rule), wall time (setup, and
summed step times including the first, compiling, step), and for synthetic data gt_mmcs (mean over
true features of the best cosine with a unit decoder row), the fraction recovered above 0.9 and
gt_mcc (a one-to-one matching of latents to features, as SAELens's synthetic benchmark scores it;
gt_recovery). A store whose maker left PATH.ground_truth.npy beside it (bench/make_synthsae.py:
SynthSAEBench-16k's generator) is scored the same way.

jaxsae runs as `configs/smollm2_fixture.py` (real data) or `configs/quickstart.py` (synthetic)
configure it, with configs/base.py's recipe: tied init, geometric-median b_pre, AuxK, decoder
projection, inputs scaled (about their mean) to mean squared norm d, linear decay to 0. It is
driven through `jaxsae.train.setup()` and its compiled `steps.train`, i.e.
train_and_evaluate's step without its logging and checkpoints.

Results go to --out (JSON lines; a rerun skips the runs already there) and a markdown table.
Datasets:
  fixture    ../shared/data/smollm2-135m-L15.acts.f16.npy as a store (made on first use with
             `python -m jaxsae.dump --from-npy`, as configs/smollm2_fixture.py says)
  NAME       a --stores NAME=PATH store (sae.d read from it); --n sets n on every real dataset
  store      --store: a store dumped from SmolLM2-135M with `python -m jaxsae.dump` (d=576)
  synthetic  configs/quickstart.py's ground-truth data (d=128, 1024 true features)
  synthsae16k  a --stores store made by bench/make_synthsae.py (SAELens's SynthSAEBench-16k
             generator: 16,384 features in d=768, hierarchy, correlations; scored with gt_mcc)

Transcoders: a --stores dataset is a transcoder (an MLP's output rebuilt from its input) when its
PATH is a folder holding the `mlp_in` and `mlp_out` stores of `python -m jaxsae.dump
--hooks=mlp_in,mlp_out --out=PATH`, or when it is written IN:TARGET (two stores with the same rows:
the dumps' token ids must match row for row), e.g.
  python bench/quality.py --datasets=mlp15 --stores=mlp15=/tmp/jaxsae/smollm2-L15-mlp \
      --trainers=jaxsae,sparsify --lrs=default,3e-3
  python bench/quality.py --datasets=tc --stores=tc=/tmp/a/mlp_in:/tmp/a/mlp_out --set=sae.skip=True
jaxsae trains with data.path=IN, data.target_path=TARGET (configs/transcoder.py; --set=sae.skip=True
for its skip transcoder); each batch is jaxsae's row-aligned pair, rows [x | y], handed as it is to
the peers. Held-out FVU is the target's, as jaxsae's eval/fvu is for a transcoder: sum ||y -
y_hat||^2 / sum ||y - mean(y)||^2 over the held-out rows in raw units, by the same numpy code for
every trainer (eval/fvu centres each held-out batch on its own mean). Only sparsify trains
transcoders among the peers (its `transcode=True`, and `skip_connection=True` with sae.skip:
bench/sparsify_peer.py); saelens and dictlearn are refused (NO_TRANSCODER says why), and so are
--lm_text (jaxsae.evaluate splices SAEs only) and architectures other than topk. Rows carry
"transcoder": true and show as "NAME (transcoder)" in the tables.
"""
import json
import math
import os
import re
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "..", "shared", "data", "smollm2-135m-L15.acts.f16.npy")

_DATASETS = flags.DEFINE_list("datasets", ["fixture", "synthetic"],
                              "fixture | store | synthetic")
_LRS = flags.DEFINE_list("lrs", ["2e-4", "6e-4", "2e-3"], "learning rates (real data)")
_SYN_LRS = flags.DEFINE_list("synthetic_lrs", ["1e-3", "3e-3"], "learning rates (synthetic)")
_TRAINERS = flags.DEFINE_list("trainers", ["jaxsae", "saelens", "sparsify"],
                              "jaxsae | saelens | sparsify | sparsify_signum | dictlearn")
_SIGNUM_LRS = flags.DEFINE_list("signum_lrs", ["auto"],
                                "learning rates of sparsify_signum ('auto': sparsify's default)")
_STEPS = flags.DEFINE_integer("steps", 150, "steps on real data (150 x 4096 = 614k tokens)")
_SYN_STEPS = flags.DEFINE_integer("synthetic_steps", 1500, "steps on synthetic data")
_STORE = flags.DEFINE_string("store", "", "activation store dumped from SmolLM2-135M")
_STORES = flags.DEFINE_list("stores", [],
                            "more stores as NAME=PATH, each usable as a --datasets name (sae.d is "
                            "read from the store), e.g. smollm2-L3=/tmp/jaxsae/datasets/smollm2-L3")
_N = flags.DEFINE_integer("n", 0, "latents on real data (0: the fixture config's 4096)")
_FIXTURE = flags.DEFINE_string("fixture", FIXTURE, "the shared fixture .npy")
_FIXTURE_STORE = flags.DEFINE_string("fixture_store", "/tmp/jaxsae/smollm2-135m-L15",
                                     "where the fixture's store is (made if missing)")
_EVAL_ROWS = flags.DEFINE_integer("eval_rows", 8192, "held-out rows (whole chunks, spread)")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "bench", "quality.jsonl"),
                           "JSON lines of results; runs already there are skipped")
_TABLE = flags.DEFINE_string("table", os.path.join(ROOT, "bench", "quality.md"),
                             "markdown table of everything in --out ('' to skip)")
_SET = flags.DEFINE_list("set", [],
                         "config overrides for these runs, e.g. sae.auxk_coef=1.0: recorded as "
                         "the runs' `variant` and shown as trainer[variant]; peers that read the "
                         "field (n, k, batch, lr, AuxK alpha) follow it")
_LM_TEXT = flags.DEFINE_string(
    "lm_text", "", "held-out text (files, globs or folders, as jaxsae.dump takes them; not the "
    "training text) on which every SAE trained on a model's store is scored inside that model by "
    "jaxsae.evaluate: loss recovered, delta loss, KL; the model, layer and windows are the store's. "
    "'' skips it. A rerun with it retrains the runs already there that lack these figures")
_LM_TOKENS = flags.DEFINE_integer("lm_tokens", 16384, "tokens of --lm_text scored")
_LM_BATCH = flags.DEFINE_integer("lm_batch_size", 8, "windows per forward pass when scoring")
_SAELENS_SET = flags.DEFINE_list(
    "saelens_set", [], "SAELens's own TopKTrainingSAEConfig fields for the saelens runs, e.g. "
    "rescale_acts_by_decoder_norm=False, decoder_init_norm=1.0, aux_loss_coefficient=0.03125: "
    "recorded in the saelens rows' `variant` as saelens.FIELD=VALUE")


# ---- configs ----------------------------------------------------------------------------------

def real_config(path: str, lr: float, target: str = ""):
  """The run on the store at `path`; with `target`, a transcoder rebuilding that store's rows."""
  from configs import smollm2_fixture
  from jaxsae.data.store import read_metadata
  c = smollm2_fixture.get_config()
  c.data.path, c.data.dtype, c.data.missing_hint = path, "", ""
  meta = read_metadata(path)
  if meta is not None:   # the fixture store is made later, with the fixture config's d
    c.sae.d = int(meta["d"])
  if target:
    c.data.target_path = target
    c.sae.d_out = int(read_metadata(target)["d"])
  if _N.value:
    c.sae.n = _N.value
  c.data.eval_rows, c.data.eval_batches = _EVAL_ROWS.value, 1 << 20   # all held-out rows
  c.train.steps, c.train.lr = _STEPS.value, lr
  c.mesh.shape = (1, 1)
  return c


def lm_target(config):
  """What jaxsae.evaluate needs to score SAEs of this run's store inside its model (the model,
  layer, window length and massive-row filter the dump recorded), or None: synthetic data, or a
  store made --from-npy, has no model to run; nor has a transcoder a way in (jaxsae.evaluate
  splices SAEs only)."""
  from jaxsae.data.store import read_metadata
  if config.data.source != "store" or config.data.target_path:
    return None
  info = (read_metadata(config.data.path) or {}).get("info") or {}
  if info.get("source") != "model" or not info.get("model"):
    return None
  return {"model": info["model"], "layer": int(info["layer"]), "seq_len": int(info["seq_len"]),
          "filter_massive": bool(info.get("filter_massive", True)),
          "massive_ratio": float(info.get("massive_ratio", 10.0))}


def synthetic_config(lr: float):
  from configs import quickstart
  c = quickstart.get_config()
  c.train.steps, c.train.lr = _SYN_STEPS.value, lr
  c.mesh.shape = (1, 1)
  return c


def run_key(r: dict) -> tuple:
  """What makes two runs the same run (a rerun skips those already in --out): dataset (a
  transcoder's apart from an SAE's of that name), n, rate (a default's marked as such: a new rule's
  default is a new run), trainer, steps and variant."""
  lr = (f"default {r['lr']:.6g}" if r.get("lr_choice") == "default" else r["lr"])
  return data_label(r), r["n"], lr, r["trainer"], r["steps"], r.get("variant", "")


def literal(text: str):
  """A flag's value as a Python literal (1.0, False, (2, 2)), else as the plain string."""
  import ast
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    return text.strip()


def apply_overrides(config, overrides: list[str]):
  """`section.field=value` items onto `config`, each value parsed as a Python literal and
  checked against the field's type; an unknown field or a bad value is a UsageError."""
  for item in overrides:
    key, sep, text = item.partition("=")
    section, _, field = key.strip().partition(".")
    if not sep or section not in config or field not in config[section]:
      raise app.UsageError(f"--set {item!r}: not section.field=value of a known field")
    try:
      config[section][field] = literal(text)
    except TypeError as e:
      raise app.UsageError(f"--set {item!r}: {e}") from None


def peer_options(items: list[str], fields=None) -> dict:
  """--saelens_set `field=value` items as keyword arguments (values parsed as Python literals);
  with `fields`, a name not among them is a UsageError."""
  out = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key.strip().isidentifier():
      raise app.UsageError(f"--saelens_set {item!r}: not field=value")
    if fields is not None and key.strip() not in fields:
      raise app.UsageError(f"--saelens_set {item!r}: TopKTrainingSAEConfig has no field "
                           f"{key.strip()!r}")
    out[key.strip()] = literal(text)
  return out


def label(r: dict) -> str:
  return f"{r['trainer']}[{r['variant']}]" if r.get("variant") else r["trainer"]


def data_label(r: dict) -> str:
  """The dataset as the tables show it: a transcoder's is marked, so it never meets SAE rows."""
  return f"{r['dataset']} (transcoder)" if r.get("transcoder") else r["dataset"]


def store_pair(path: str) -> tuple[str, str]:
  """A --stores PATH as (input store, target store, "" for an SAE): IN:TARGET names a
  transcoder's two stores (a ':' before '//' is a URL's, gs://...); a folder holding no store of
  its own but `mlp_in` and `mlp_out` ones (jaxsae.dump --hooks=mlp_in,mlp_out) is that MLP's
  transcoder."""
  from jaxsae import paths
  from jaxsae.data.store import read_metadata
  parts = re.split(r":(?!//)", path)
  if len(parts) > 2 or not all(parts):
    raise app.UsageError(f"--stores {path!r}: not PATH or IN:TARGET")
  if len(parts) == 2:
    return parts[0], parts[1]
  pair = paths.join(path, "mlp_in"), paths.join(path, "mlp_out")
  if read_metadata(path) is None and all(read_metadata(p) is not None for p in pair):
    return pair
  return path, ""


def ensure_fixture_store(path: str):
  from jaxsae.data.store import read_metadata
  if read_metadata(path) is not None:
    return
  tokens = _FIXTURE.value.replace(".acts.f16.npy", ".tokens.i32.npy")
  cmd = [sys.executable, "-m", "jaxsae.dump", f"--from-npy={_FIXTURE.value}",
         f"--tokens-npy={tokens}", f"--out={path}", "--chunk_rows=1024", "--shard_rows=16384",
         "--progress=false"]
  print("making the fixture store:", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)


# ---- peers -----------------------------------------------------------------------------------

PEER_OF = {"saelens": "saelens", "sparsify": "sparsify", "sparsify_signum": "sparsify",
           "dictlearn": "dictlearn"}
# Peers with their own BatchTopK and Matryoshka BatchTopK: they train the architecture jaxsae's
# config names (--set=sae.architecture=...); sparsify has neither.
ARCHITECTURE_PEERS = ("saelens", "dictlearn")
# Peers that cannot train a transcoder, and why (sparsify can: its transcode=True).
NO_TRANSCODER = {
    "saelens": "SAELens's transcoders (sae_lens.saes.transcoder) are for inference only: its "
               "trainer trains TrainingSAEs, which rebuild their own input",
    "dictlearn": "dictionary_learning 0.1.0 has no transcoder trainer: trainSAE's transcoder flag "
                 "changes only its logging, and every trainer's loss rebuilds its own input "
                 "(TopKTrainer: e = x - x_hat)"}


def make_peer(trainer: str, run, config, spec, window: int):
  """The peer for `trainer`, with jaxsae's n, k, batch, steps, lr, seed, dead-latent rule and LR
  schedule (warmup, then the decay) where the peer takes one."""
  from bench import peers
  from jaxsae import optim
  mod = peers.load(PEER_OF[trainer])
  B, steps, lr = config.train.batch_size, config.train.steps, config.train.lr
  warmup, decay = optim.schedule_steps(config.train)
  if trainer == "saelens":
    # Raw inputs: SAELens's own default (normalize_activations="none"), its best on real data.
    options = peer_options(_SAELENS_SET.value)
    coef = options.pop("aux_loss_coefficient", 1.0)
    return mod.Peer(spec.d, spec.n, spec.k, lr, B, steps, window, input_scale=None,
                    decay_steps=decay, warmup_steps=warmup, seed=config.train.seed,
                    aux_loss_coefficient=coef, sae_options=options,
                    architecture=spec.architecture, prefixes=spec.prefixes)
  if trainer == "dictlearn":
    # Its normalize_activations target is mean squared norm 1; jaxsae's scale s gives s * x mean
    # squared norm d ("d") or 1 ("unit"), so the mean squared norm it estimated is target / s^2.
    target = {"d": spec.d, "unit": 1.0}.get(config.data.normalize)
    norm = math.sqrt(target) / run.input_scale if target else None
    return mod.Peer(spec.d, spec.n, spec.k, lr, B, steps, spec.dead_tokens, norm_factor=norm,
                    warmup_steps=warmup, decay_steps=decay, seed=config.train.seed,
                    architecture=spec.architecture, prefixes=spec.prefixes)
  if spec.transcoder and spec.d_out != spec.d:
    raise app.UsageError(f"{trainer}: sparsify's transcoders rebuild outputs of the input's width "
                         f"(d={spec.d}), not d_out={spec.d_out}")
  return mod.Peer(spec.d, spec.n, spec.k, lr, B, steps, spec.dead_tokens,
                  optimizer="adam" if trainer == "sparsify" else "signum",
                  auxk_alpha=spec.auxk_coef, warmup_steps=warmup,
                  multi_topk=spec.multi_topk, seed=config.train.seed,
                  transcode=spec.transcoder, skip=spec.skip)


def default_lr(trainer: str, config) -> float:
  """What each trainer picks when it is given no learning rate: jaxsae's automatic rate (from the
  shapes and the data's density: what train.setup resolves), sparsify's and dictionary_learning's
  2e-4 * sqrt(2^14 / n) (sparsify's signum: 5e-3 * ...), SAELens's 3e-4
  (LanguageModelSAERunnerConfig.lr)."""
  if trainer == "jaxsae":   # the data's statistics only, not a whole train.setup (state, mesh)
    from jaxsae import model, optim, train
    c = config.copy_and_resolve_references()
    c.train.lr = None
    data = train.open_data(c, model.SaeSpec.from_config(c))
    try:
      return optim.resolve_lr(c, train.init_statistics(c, data).density)[0]
    finally:
      data.close()
  if trainer == "saelens":
    return 3e-4
  from bench import sparsify_peer   # dictionary_learning's rule is sparsify's adam one
  optimizer = "signum" if trainer == "sparsify_signum" else "adam"
  return sparsify_peer.default_lr(config.sae.n, optimizer)


def trainer_versions(trainer: str) -> dict:
  if trainer == "jaxsae":
    return {}
  from bench import peers
  return peers.load(PEER_OF[trainer]).versions()


# ---- one lockstep run -------------------------------------------------------------------------

def fvu(x, x_hat):
  import numpy as np
  x = x.astype(np.float64)
  return float(np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2))


def jaxsae_reconstruct(params, scale: float, k: int, x, out_scale: float | None = None):
  """(output, l0 per row) of raw input rows x, in raw units: the output is scaled by out_scale (a
  transcoder's target scale; None: the input's)."""
  import jax
  import numpy as np
  from jaxsae import model
  out_scale = scale if out_scale is None else out_scale

  @jax.jit
  def rec(params, xb):
    vals, idx = model.encode(params, xb * scale, k)
    return (model.decode(params, vals, idx, xb * scale) / out_scale,
            jax.numpy.sum(vals > 0, axis=1))

  outs, l0s = [], []
  for i in range(0, len(x), 4096):
    o, l = rec(params, np.asarray(x[i:i + 4096], np.float32))
    outs.append(np.asarray(o, np.float64))
    l0s.append(np.asarray(l))
  return np.concatenate(outs), np.concatenate(l0s)


def gt_recovery(w_unit, truth) -> dict:
  """How well unit decoder rows w_unit [n, d] recover the unit true features truth [F, d]:
  gt_mmcs, the mean over features of the best cosine with any row, and the fraction above 0.9;
  gt_mcc, the mean |cosine| of a one-to-one matching of rows to features (Hungarian: SAELens's
  synthetic mean_correlation_coefficient, over min(n, F) pairs). With more features than latents
  (superposition) gt_mmcs is bounded by the features no latent can spare, gt_mcc is not."""
  import numpy as np
  from scipy.optimize import linear_sum_assignment
  cos = np.asarray(truth, np.float32) @ np.asarray(w_unit, np.float32).T
  best = np.max(cos, axis=1)
  rows, cols = linear_sum_assignment(np.abs(cos), maximize=True)
  return {"gt_mmcs": float(best.mean()), "gt_recovered_frac": float(np.mean(best > 0.9)),
          "gt_mcc": float(np.abs(cos[rows, cols]).mean())}


def store_ground_truth(config):
  """A store's true features, where its maker left them beside it (PATH.ground_truth.npy, as
  bench/make_synthsae.py does), else None."""
  import numpy as np
  path = config.data.path.rstrip("/") + ".ground_truth.npy"
  return np.load(path) if config.data.source == "store" and os.path.exists(path) else None


def jaxsae_recipe(config) -> str:
  """What jaxsae's runs are trained with: a run recorded under another recipe is run again."""
  from jaxsae import model
  s, t = config.sae, config.train
  k_aux = model.resolve_k_aux(s.k_aux, s.d, s.n) if s.auxk_coef > 0 else 0
  if config.data.target_path:
    init = (f"transcoder{' with skip' if s.skip else ''}: untied init (encoder norm "
            f"{s.encoder_init_norm:g}), geometric-median b_pre and target b_dec")
  else:
    init = f"tied init (encoder norm {s.encoder_init_norm:g}), geometric-median b_pre and b_dec"
  return (("BatchTopK (JumpReLU at inference), " if s.architecture != "topk" else "") +
          f"{init} (b_dec at the full rate), AuxK k_aux={k_aux} alpha={s.auxk_coef:g} "
          f"relu={s.auxk_relu}, projected unit decoder at {t.decoder_lr_ratio:g}x the rate, lr decay "
          f"over the last {t.decay_frac:g}, Adam eps {t.eps:g}")


def jaxsae_weights(params, scale: float, k: int, target: dict | None, threshold=None):
  """jaxsae's SAE in raw units (the input scale folded in as its exports fold it); a BatchTopK
  SAE (threshold given) as its JumpReLU."""
  import numpy as np
  from jaxsae import sae_io
  p = {name: np.asarray(a, np.float32) for name, a in params.items()}
  where = {"model": target["model"], "hook": f"model.layers.{target['layer']}"} if target else {}
  b_enc = p["b_enc"] + p["W_enc"] @ (p["b_dec"] - p["b_pre"])   # one bias, as export.py folds
  return sae_io.SaeWeights(
      p["W_enc"].T * scale, b_enc, p["W_dec"] / scale, p["b_dec"] / scale,
      0 if threshold is not None else k, kind="jaxsae", path="jaxsae (its params)",
      threshold=None if threshold is None else np.full(p["b_enc"].shape, threshold), **where)


def lm_figures(saes: list, target: dict) -> list[dict]:
  """jaxsae.evaluate's figures for each SAE, over the same --lm_text windows, as lm_* fields."""
  from jaxsae import evaluate
  results = evaluate.evaluate_many(
      saes, target["model"], target["layer"], _LM_TEXT.value, _LM_TOKENS.value,
      target["seq_len"], _LM_BATCH.value, device="cpu", filter_massive=target["filter_massive"],
      massive_ratio=target["massive_ratio"], allow_other_model=True)
  keys = ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "loss_recovered", "delta_loss", "kl",
          "fvu", "l0", "tokens")
  return [{**{"lm_" + key: r[key] for key in keys}, "lm_text": _LM_TEXT.value,
           "lm_sae": r["sae"]} for r in results]


def run_pair(dataset: str, config, trainers, lm: dict | None = None) -> list[dict]:
  import jax
  import numpy as np
  from jaxsae import mesh as mesh_lib, train

  load0 = os.getloadavg()[0]
  t0 = time.perf_counter()
  run = train.setup(config)
  jax.block_until_ready(run.state)
  setup_s = {"jaxsae": time.perf_counter() - t0}
  spec, B, steps = run.spec, config.train.batch_size, config.train.steps
  window = -(-spec.dead_tokens // B)   # steps without firing after which a latent is dead
  peers = {}
  for t in trainers:
    if t == "jaxsae":
      continue
    t0 = time.perf_counter()
    peers[t] = make_peer(t, run, config, spec, window)
    setup_s[t] = time.perf_counter() - t0
  state = run.state
  step_s = {t: [] for t in trainers}
  for i in range(steps):
    batch = np.asarray(next(run.data.train), np.float32)
    if "jaxsae" in trainers:
      t0 = time.perf_counter()
      state, _, guard = run.steps.train(
          state, mesh_lib.host_batch_to_global(batch, run.batch_sharding, B))
      jax.block_until_ready(state)
      step_s["jaxsae"].append(time.perf_counter() - t0)
      if bool(guard["skipped"]):
        raise RuntimeError(f"jaxsae step {i}: non-finite loss")
    for t, peer in peers.items():
      t0 = time.perf_counter()
      peer.step(batch)
      peer.sync()
      step_s[t].append(time.perf_counter() - t0)
    if (i + 1) % 25 == 0:
      print(f"  {dataset} lr={config.train.lr:g} step {i + 1}/{steps} "
            + " ".join(f"{t} {np.sum(v):.0f}s" for t, v in step_s.items()), flush=True)
  load1 = os.getloadavg()[0]

  held = held_y = None
  if run.data.eval_batches is not None:
    held = np.concatenate([np.asarray(b, np.float32) for b in run.data.eval_batches()])
    held_y = held
    if spec.transcoder:   # rows [x | y]: every trainer encodes x and is scored on y
      held, held_y = held[:, :spec.d], held[:, spec.d:]
  common = {"dataset": dataset, "lr": config.train.lr, "n": spec.n, "k": spec.k, "d": spec.d,
            "batch": B, "steps": steps, "tokens": steps * B, "dead_tokens": spec.dead_tokens,
            "eval_rows": 0 if held is None else len(held), "load_start": load0, "load_end": load1,
            "date": time.strftime("%Y-%m-%d %H:%M")}
  if spec.transcoder:
    common.update(transcoder=True, d_out=spec.d_out, data_path=config.data.path,
                  target_path=config.data.target_path)
  truth = (run.data.ground_truth if run.data.ground_truth is not None
           else store_ground_truth(config))
  out, saes = [], []
  for t in trainers:
    rec = dict(common, trainer=t, setup_s=setup_s[t], train_s=float(np.sum(step_s[t])),
               step_s_median=float(np.median(step_s[t][1:] or step_s[t])),
               step_s_first=step_s[t][0])
    rec["tokens_per_s"] = B / rec["step_s_median"]
    if t == "jaxsae":
      params = jax.device_get(state.params)
      rec["dead_frac"] = float(np.mean(np.asarray(state.since_fired) >= spec.dead_tokens))
      rec["recipe"] = jaxsae_recipe(config)
      w_unit = params["W_dec"] / np.linalg.norm(params["W_dec"], axis=1, keepdims=True)
      threshold = None if state.threshold is None else float(state.threshold)
      weights = (jaxsae_weights(params, run.input_scale, spec.k, lm, threshold)
                 if lm or threshold is not None else None)
      jumprelu = weights if threshold is not None else None
      if held is not None:
        if threshold is None:
          target_scale = None if state.target_scale is None else float(state.target_scale)
          x_hat, l0 = jaxsae_reconstruct(params, run.input_scale, spec.k, held, target_scale)
        else:   # BatchTopK: the JumpReLU it exports
          from bench import peers as peers_lib
          x_hat, l0 = peers_lib.numpy_reconstruct(weights, held)
      if lm:
        saes.append(weights)
    else:
      peer = peers[t]
      peer.finish()
      rec["dead_frac"] = peer.dead_frac()
      rec["recipe"] = peer.recipe
      w_unit = peer.decoder_directions()
      if held is not None:
        x_hat, l0 = peer.reconstruct(held)
      weights = peer.sae_weights() if lm or spec.batchtopk else None
      if lm:
        saes.append(weights)
      jumprelu = weights if spec.batchtopk else None   # its own BatchTopK (--set)
    if held is not None:
      rec["eval_fvu"], rec["eval_l0"] = fvu(held_y, x_hat), float(np.mean(l0))
      if jumprelu is not None:   # BatchTopK / Matryoshka: also scored at L0 = k (peers.py)
        from bench import peers as peers_lib
        rec["equal_l0_threshold"], x_k = peers_lib.at_equal_l0(jumprelu, held, spec.k)
        rec["eval_fvu_at_k"] = fvu(held, x_k)
    if truth is not None:
      rec.update(gt_recovery(w_unit, truth))
    out.append(rec)
  run.data.close()
  if lm:
    t0 = time.perf_counter()
    for rec, figures in zip(out, lm_figures(saes, lm)):
      rec.update(figures, lm_eval_s=time.perf_counter() - t0)
  return out


# ---- table ------------------------------------------------------------------------------------

def summary(records: list[dict]) -> list[str]:
  """Dataset x trainer: the best swept learning rate and the trainer's default, FVU / dead."""
  f = lambda r: (f"{r['eval_fvu']:.4f} / {100 * r['dead_frac']:.1f}% (lr {r['lr']:.3g})"
                 if r and "eval_fvu" in r else "-")
  groups = {}
  for r in records:
    if "eval_fvu" in r and not r.get("variant"):   # variants are in the full table below
      groups.setdefault((data_label(r), r.get("n", 0), r.get("steps", 0), label(r)), []).append(r)
  lines = ["Summary: held-out FVU / dead latents (learning rate), best over the swept rates and at "
           "each trainer's own default rate (`--lrs=default`).", "",
           "| data | n | tokens | trainer | best swept | default | default / best |",
           "|---|---|---|---|---|---|---|"]
  for (ds, n, steps, name), rs in sorted(groups.items()):
    if name == "jaxsae":   # its newest recipe only: older recipes' rows stay in the full table
      newest = max(rs, key=lambda r: r.get("date", "")).get("recipe")
      rs = [r for r in rs if r.get("recipe") == newest]
    # The default is the newest default run by date, then by place in the file (an older rule's
    # default is a swept rate like any).
    defaults = [(r.get("date", ""), i, r) for i, r in enumerate(rs)
                if r.get("lr_choice") == "default"]
    default = max(defaults, key=lambda t: t[:2])[2] if defaults else None
    swept = [r for r in rs if r is not default and r["lr"] != (default or {}).get("lr")]
    best = min(swept, key=lambda r: r["eval_fvu"]) if swept else None
    ratio = (f"{default['eval_fvu'] / best['eval_fvu']:.3f}" if best and default else "-")
    lines.append(f"| {ds} | {n} | {rs[0]['tokens']:,} | {name} | {f(best)} | {f(default)} | "
                 f"{ratio} |")
  return lines + ["", "Commands: `python bench/quality.py --datasets=D --trainers=T "
                   "--lrs=default,LR,...` (`--stores=NAME=PATH` for the stores of "
                   "bench/make_datasets.sh); bench/RESULTS.md gives the exact ones for each set of "
                   "rows.", ""]


def lm_table(records: list[dict]) -> list[str]:
  """The runs scored inside their model (--lm_text): loss recovered, delta loss and KL beside FVU."""
  scored = [r for r in records if "lm_loss_recovered" in r]
  if not scored:
    return []
  lines = ["Inside the model (`--lm_text`): each SAE spliced into the model it was trained on, over "
           "the same held-out text windows (not the training text), scored by "
           "`jaxsae.evaluate.evaluate_many`. Loss recovered = (CE_zero - CE_spliced) / (CE_zero - "
           "CE_clean); delta loss = CE_spliced - CE_clean and KL(clean || spliced) in nats per "
           "token; FVU here is over the text's activations.", "",
           "| data | n | trainer | lr | held-out FVU | text FVU | loss recovered | delta loss | KL | "
           "CE clean / zero | tokens |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(scored, key=lambda r: (r["dataset"], r["n"], r["lr"], label(r))):
    lr = f"{r['lr']:.3g}" + (" (default)" if r.get("lr_choice") == "default" else "")
    lines.append(f"| {r['dataset']} | {r['n']} | {label(r)} | {lr} | {r['eval_fvu']:.4f} | "
                 f"{r['lm_fvu']:.4f} | {r['lm_loss_recovered']:.4f} | {r['lm_delta_loss']:.4f} | "
                 f"{r['lm_kl']:.4f} | {r['lm_ce_clean']:.3f} / {r['lm_ce_zero']:.3f} | "
                 f"{r['lm_tokens']:,} |")
  return lines + [""]


def table(records: list[dict]) -> str:
  lines = summary(records) + lm_table(records) + [
      "All runs:", "",
      "| data | n | trainer | lr | tokens | eval FVU | eval L0 | FVU at L0=k | dead | gt_mmcs | "
      "gt >0.9 | gt_mcc | setup s | train s | tok/s (median step) | load |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  f = lambda r, key, fmt: format(r[key], fmt) if key in r else "-"
  for r in sorted(records, key=lambda r: (data_label(r), r.get("n", 0), r["lr"], label(r))):
    lines.append(
        f"| {data_label(r)} | {r.get('n', '-')} | {label(r)} | {r['lr']:g} | {r['tokens']:,} | "
        f"{f(r, 'eval_fvu', '.4f')} | {f(r, 'eval_l0', '.1f')} | {f(r, 'eval_fvu_at_k', '.4f')} | "
        f"{100 * r['dead_frac']:.1f}% | "
        f"{f(r, 'gt_mmcs', '.3f')} | {f(r, 'gt_recovered_frac', '.1%')} | "
        f"{f(r, 'gt_mcc', '.3f')} | {r['setup_s']:.1f} | "
        f"{r['train_s']:.0f} | {r['tokens_per_s']:,.0f} | {r['load_start']:.1f}-{r['load_end']:.1f} |")
  best = {}
  for r in records:
    key = (data_label(r), label(r))
    metric = r.get("eval_fvu", -r.get("gt_mmcs", 0.0))
    if key not in best or metric < best[key][0]:
      best[key] = (metric, r)
  lines += ["", "Best learning rate per trainer (lowest eval FVU):", "",
            "| data | trainer | best lr | eval FVU | dead | gt_mmcs | gt_mcc |",
            "|---|---|---|---|---|---|---|"]
  for (ds, t), (_, r) in sorted(best.items()):
    lines.append(f"| {ds} | {t} | {r['lr']:g} | {f(r, 'eval_fvu', '.4f')} | "
                 f"{100 * r['dead_frac']:.1f}% | {f(r, 'gt_mmcs', '.3f')} | "
                 f"{f(r, 'gt_mcc', '.3f')} |")
  return "\n".join(lines) + "\n"


def check_transcoder_run(dataset: str, architecture: str):
  """Refuses what a transcoder dataset cannot run: a peer without transcoders (NO_TRANSCODER),
  --lm_text, an architecture other than topk (its JumpReLU is scored through sae_io, which reads
  SAEs only)."""
  refused = [t for t in _TRAINERS.value if PEER_OF.get(t) in NO_TRANSCODER]
  if refused:
    raise app.UsageError(f"--datasets={dataset} is a transcoder: --trainers " + "; ".join(
        f"{t} cannot train one ({NO_TRANSCODER[PEER_OF[t]]})" for t in refused))
  if _LM_TEXT.value:
    raise app.UsageError(f"--datasets={dataset} is a transcoder: no --lm_text (jaxsae.evaluate "
                         f"splices SAEs only)")
  if architecture != "topk":
    raise app.UsageError(f"--datasets={dataset} is a transcoder: only sae.architecture=topk is "
                         f"scored here, not {architecture}")


def main(_):
  import jax

  done = []
  if os.path.exists(_OUT.value):
    with open(_OUT.value) as f:
      done = [json.loads(line) for line in f if line.strip()]
    done = list({run_key(r): r for r in done}.values())   # a rerun's row replaces the older one
  if _SAELENS_SET.value:   # a bad item stops the run before any training
    if "saelens" not in _TRAINERS.value:
      raise app.UsageError("--saelens_set needs saelens in --trainers")
    import dataclasses
    from sae_lens import TopKTrainingSAEConfig
    peer_options(_SAELENS_SET.value, {f.name for f in dataclasses.fields(TopKTrainingSAEConfig)})

  def variant(trainer: str) -> str:
    own = [f"saelens.{item}" for item in _SAELENS_SET.value] if trainer == "saelens" else []
    return ",".join(_SET.value + own)

  have = {run_key(r): r for r in done}
  unknown = set(_TRAINERS.value) - {"jaxsae", *PEER_OF}
  if unknown:
    raise app.UsageError(f"--trainers: unknown {sorted(unknown)}")
  architecture = next((item.partition("=")[2].strip().strip("'\"") for item in _SET.value
                       if item.partition("=")[0].strip() == "sae.architecture"), "topk")
  lacking = [t for t in _TRAINERS.value if t != "jaxsae" and architecture != "topk"
             and PEER_OF[t] not in ARCHITECTURE_PEERS]
  if lacking:
    raise app.UsageError(f"--trainers {lacking}: no {architecture} there (only "
                         f"{', '.join(ARCHITECTURE_PEERS)} train it)")

  stores = {}
  for item in _STORES.value:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise app.UsageError(f"--stores {item!r}: not NAME=PATH")
    stores[name] = path
  lockstep = [t for t in _TRAINERS.value if t != "sparsify_signum"]
  plans = []   # (dataset, store path, target store path or "", lr, trainers)
  for ds in _DATASETS.value:
    target = ""
    if ds == "synthetic":
      path, lrs = None, _SYN_LRS.value
    elif ds == "fixture":
      path, lrs = _FIXTURE_STORE.value, _LRS.value
    elif ds == "store":
      if not _STORE.value:
        raise app.UsageError("--datasets=store needs --store=PATH")
      path, lrs = _STORE.value, _LRS.value
    elif ds in stores:
      (path, target), lrs = store_pair(stores[ds]), _LRS.value
    else:
      raise app.UsageError(f"unknown dataset {ds!r}: not fixture, store, synthetic or a --stores "
                           f"name ({sorted(stores)})")
    if target:
      check_transcoder_run(ds, architecture)
    if lockstep:
      plans += [(ds, path, target, lr, lockstep) for lr in lrs if lr != "default"]
      # "default": every trainer at its own default learning rate, so each trains alone
      plans += [(ds, path, target, lr, [t]) for lr in lrs if lr == "default" for t in lockstep]
    if "sparsify_signum" in _TRAINERS.value:
      plans += [(ds, path, target, lr, ["sparsify_signum"]) for lr in _SIGNUM_LRS.value]
  print(f"jax {jax.__version__}, " + ", ".join(
      f"{t} {trainer_versions(t)}" for t in _TRAINERS.value if t != "jaxsae")
        + f", {os.cpu_count()} cores", flush=True)

  for ds, path, target, lr, trainers in plans:
    steps = _SYN_STEPS.value if ds == "synthetic" else _STEPS.value
    config = synthetic_config(0.0) if ds == "synthetic" else real_config(path, 0.0, target)
    if lr == "auto":   # sparsify's own default for its signum optimizer
      from bench import sparsify_peer
      lr = sparsify_peer.default_lr(config.sae.n, "signum")
    apply_overrides(config, _SET.value)
    choice = "default" if lr == "default" else ""
    config.train.lr = default_lr(trainers[0], config) if choice else float(lr)
    lr = config.train.lr
    lm = lm_target(config) if _LM_TEXT.value else None

    def missing(t):
      r = have.get(run_key(dict(dataset=ds, n=config.sae.n, lr=lr, trainer=t, steps=steps,
                                variant=variant(t), lr_choice=choice,
                                transcoder=bool(target))))
      return (r is None or (lm is not None and "lm_loss_recovered" not in r)
              or (t == "jaxsae" and r.get("recipe") != jaxsae_recipe(config))
              or (config.sae.architecture != "topk" and "eval_fvu_at_k" not in r))

    todo = [t for t in trainers if missing(t)]
    if not todo:
      continue
    if ds == "fixture":
      ensure_fixture_store(path)
    print(f"{ds} lr={lr:g}: {', '.join(todo)}", flush=True)
    if _LM_TEXT.value and lm is None:
      print(f"{ds}: no model recorded with its data, so no loss recovered or KL", flush=True)
    for rec in run_pair(ds, config, todo, lm):
      rec.update(jax=jax.__version__, **trainer_versions(rec["trainer"]))
      if choice:
        rec["lr_choice"] = choice
      if variant(rec["trainer"]):
        rec["variant"] = variant(rec["trainer"])
      print(json.dumps(rec), flush=True)
      with open(_OUT.value, "a") as f:
        f.write(json.dumps(rec) + "\n")
      done = [r for r in done if run_key(r) != run_key(rec)] + [rec]
  text = table(done)
  print(text)
  if _TABLE.value:
    with open(_TABLE.value, "w") as f:
      f.write(text)


if __name__ == "__main__":
  # Run as a script, bench/ is sys.path[0]: drop it (bench/__init__.py says why), add the root.
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(
      os.path.abspath(__file__))]
  sys.path.insert(0, ROOT)
  app.run(main)
