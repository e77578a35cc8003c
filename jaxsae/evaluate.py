r"""Scores an SAE inside its language model: spliced next-token loss, KL, and reconstruction figures.

  python -m jaxsae.evaluate --sae=SAE --model=PATH --layer=L --text=FILES --tokens=N \
      [--seq_len=T] [--batch_size=B] [--device=auto|cpu|cuda] [--json=OUT.json]

SAE is a jaxsae workdir (newest checkpoint, or --step), any jaxsae export (saelens, sparsify, npz),
or a top-k SAE saved by SAELens or sparsify themselves (jaxsae/sae_io.py reads them all the same
way). PATH, --layer and --text are what `python -m jaxsae.dump` takes, and are used through the same
code (jaxsae/data/lm.py): the same hook on block L's output, the same documents joined by EOS and
cut into the same --seq_len windows, --batch_size windows per forward. An SAE whose recorded d,
hook point or model differs from these is refused, naming both, before the model runs.

Over the same windows the model runs four times per batch: clean, and with block L's output
replaced by the SAE's reconstruction (spliced), by zeros, and by the mean activation over all the
evaluated positions (computed in a first pass). Reported, over every next-token prediction:

  ce_clean, ce_spliced, ce_zero, ce_mean   mean cross-entropy (nats per token)
  loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)     1: as good as the model
  delta_loss = ce_spliced - ce_clean
  kl = KL(clean || spliced), nats per token

and on the activations the SAE saw: fvu (sum |x - x_hat|^2 / sum |x - mean|^2), l0, dead_frac (no
firing on any evaluated token), dense_frac (firing on more than --dense_freq of them), and the
histogram of log10 firing frequencies. Rows the dump drops as massive (norm above --massive_ratio x
their batch's median: first positions, separators) are not in training data, so they are not
spliced or ablated here either (the clean activation stays) and are left out of the SAE figures;
position 0 is treated like any other position (it is dropped when it is massive, as in the dump).
"""
import importlib.metadata
import json
import os
import re
import sys

import numpy as np
from absl import app, flags

from jaxsae import paths, sae_io
from jaxsae.data import inputs
from jaxsae.data.source import DataError

KEYS = ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "loss_recovered", "delta_loss", "kl", "fvu",
        "l0", "dead_frac", "dense_frac", "tokens")
ENCODE_FLOATS = 16 << 20   # pre-activations [rows, n] computed at a time (64 MiB of float32)
NOT_A_MODEL = ("synthetic",)   # what a jaxsae run records when it did not train on a model's output


class EvaluateError(ValueError):
  pass


# ---- does the SAE belong at this hook point? ----------------------------------------------------

def same_model(recorded: str, given: str) -> bool:
  """The same path, or the same name: a peer records "SmolLM2-135M", a run "/models/SmolLM2-135M"."""
  if os.path.exists(recorded) and os.path.exists(given):
    return os.path.realpath(recorded) == os.path.realpath(given)
  stem = lambda p: os.path.splitext(os.path.basename(os.path.normpath(p)))[0].lower()
  return stem(recorded) == stem(given)


def same_hook(recorded: str, hook_name: str, layer: int) -> bool:
  """jaxsae records the module path ("model.layers.6"), sparsify the path under the base model
  ("layers.6"), SAELens TransformerLens's name for the same place ("blocks.6.hook_resid_post")."""
  if recorded == hook_name:
    return True
  tl = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", recorded)
  if tl:
    return int(tl.group(1)) == layer
  return recorded.split(".")[-1].isdigit() and hook_name.endswith("." + recorded)


def check(sae, net, model: str, layer: int, allow_other_model: bool) -> list[str]:
  """Raises EvaluateError if the SAE was trained elsewhere; returns notes on what was not checked."""
  notes = []
  if sae.d != net.d:
    raise EvaluateError(f"the SAE takes d={sae.d} ({sae.path}) but {model} has hidden size d={net.d}")
  if sae.hook and not same_hook(sae.hook, net.hook_name, layer):
    raise EvaluateError(f"the SAE was trained on hook {sae.hook!r}; --layer={layer} is hook "
                        f"{net.hook_name!r} of {model}")
  if not sae.hook:
    notes.append("the SAE records no hook point: not checked")
  if sae.model in NOT_A_MODEL:
    raise EvaluateError(f"the SAE was trained on {sae.model} data, not on {model}'s activations")
  if sae.model and not same_model(sae.model, model):
    if not allow_other_model:
      raise EvaluateError(f"the SAE was trained on model {sae.model!r}, not {model!r} (if these are "
                          "the same weights, e.g. a GGUF and the HF folder saved from it, pass "
                          "--allow_other_model)")
    notes.append(f"the SAE was trained on {sae.model!r}; evaluated on {model!r} as asked")
  if not sae.model:
    notes.append("the SAE records no model: not checked")
  return notes


# ---- the SAE in torch ---------------------------------------------------------------------------

class TorchSae:
  """sae_io's SaeWeights on the model's device; encodes and decodes rows of block L's output."""

  def __init__(self, sae, device):
    import torch
    self.k, self.n = sae.k, sae.n
    # torch.tensor copies: arrays from jax (bench/quality.py) are read-only.
    self.w_enc, self.b_enc, self.w_dec, self.b_dec = (
        torch.tensor(a, device=device) for a in (sae.w_enc, sae.b_enc, sae.w_dec, sae.b_dec))
    self.threshold = None if sae.threshold is None else torch.tensor(sae.threshold, device=device)
    self.rows = max(1, ENCODE_FLOATS // sae.n)

  def __call__(self, x):
    """(x_hat [rows, d], firings per latent [n] int64, nonzero codes) of x [rows, d] float32."""
    import torch
    out, fires, nonzero = [], torch.zeros(self.n, dtype=torch.int64, device=x.device), 0
    for a in range(0, len(x), self.rows):
      pre = (x[a:a + self.rows] - self.b_dec) @ self.w_enc + self.b_enc
      if self.threshold is not None:   # JumpReLU: every latent above its threshold
        z = torch.where(pre > self.threshold, pre.relu(), 0.0)
        out.append(z @ self.w_dec + self.b_dec)
        fires += (z > 0).sum(0)
        nonzero += int((z > 0).sum())
        continue
      vals, idx = pre.topk(self.k, dim=1)
      vals = vals.relu()
      # x_hat = sum_j z_j W_dec[j] over the k picks: a weighted bag of decoder rows.
      out.append(torch.nn.functional.embedding_bag(idx, self.w_dec, per_sample_weights=vals,
                                                   mode="sum") + self.b_dec)
      fired = vals > 0
      fires += torch.bincount(idx[fired], minlength=self.n)
      nonzero += int(fired.sum())
    return torch.cat(out), fires, nonzero


# ---- the evaluation ----------------------------------------------------------------------------

def _next_token_stats(logits, ids, clean_logits=None):
  """(summed cross-entropy of positions 0..T-2 predicting 1..T-1, summed KL(clean || these) when
  clean_logits are given). In float64, one window at a time: the differences that matter (delta
  loss, KL, and loss recovered's denominator on a model barely hurt by ablation) are small beside
  the losses, and float32 sums over a window's vocabulary-wide rows would blur them."""
  import torch
  ce = kl = 0.0
  for i in range(len(ids)):
    logp = torch.log_softmax(logits[i, :-1].double(), dim=-1)
    ce -= float(logp.gather(-1, ids[i, 1:, None]).sum())
    if clean_logits is not None:
      ref = torch.log_softmax(clean_logits[i, :-1].double(), dim=-1)
      kl += float((ref.exp() * (ref - logp)).sum())
  return ce, kl


def evaluate(sae_path: str, model: str, layer: int, text: str, tokens: int = 0,
             seq_len: int = 1024, batch_size: int = 8, device: str = "auto",
             compute_dtype: str = "float32", step: int = -1, filter_massive=None,
             massive_ratio=None, dense_freq: float = 0.1, allow_other_model: bool = False,
             progress: bool = False) -> dict:
  """Every figure of the module docstring, as the dict --json writes."""
  return evaluate_many([sae_path], model, layer, text, tokens, seq_len, batch_size, device,
                       compute_dtype, step, filter_massive, massive_ratio, dense_freq,
                       allow_other_model, progress)[0]


def _dump_setting(saes, name: str, given, fallback):
  """A filter setting: as given, else what the SAEs' runs record (they must agree), else fallback."""
  if given is not None:
    return given
  recorded = {(s.meta.get("dump") or {}).get(name) for s in saes} - {None}
  if len(recorded) > 1:
    raise EvaluateError(f"the SAEs' runs were dumped with different {name} ({sorted(recorded)}): "
                        f"pass --{name}")
  return recorded.pop() if recorded else fallback


def evaluate_many(saes: list, model: str, layer: int, text: str, tokens: int = 0,
                  seq_len: int = 1024, batch_size: int = 8, device: str = "auto",
                  compute_dtype: str = "float32", step: int = -1, filter_massive=None,
                  massive_ratio=None, dense_freq: float = 0.1, allow_other_model: bool = False,
                  progress: bool = False) -> list[dict]:
  """`evaluate` for several SAEs of the same hook point (paths, or sae_io.SaeWeights) over the same
  windows: the clean, zero- and mean-ablated runs are made once and shared, so scoring m SAEs
  costs 3 + m forward passes per batch, not 4m. One result dict per SAE, in order."""
  import torch
  import tqdm
  from jaxsae.data import lm
  names = [s.path if isinstance(s, sae_io.SaeWeights) else s for s in saes]
  saes = [s if isinstance(s, sae_io.SaeWeights) else sae_io.load(s, step) for s in saes]
  if not saes:
    raise EvaluateError("no SAE to evaluate")
  if not text:
    raise EvaluateError("--text is required (the files to run the model on)")
  files = inputs.expand_files(text)
  net = lm.BlockOutput(model, layer, device, compute_dtype, whole_model=True)
  notes = [check(sae, net, model, layer, allow_other_model) for sae in saes]
  # The dump's filter settings the SAEs' data was made with, when their runs record them.
  filter_massive = bool(_dump_setting(saes, "filter_massive", filter_massive, True))
  massive_ratio = float(_dump_setting(saes, "massive_ratio", massive_ratio, 10.0))
  windows = [w for w, _ in net.windows(files, seq_len, tokens)]
  if not windows:
    raise EvaluateError(f"--text={text!r} ({len(files)} files) holds fewer than --seq_len="
                        f"{seq_len} tokens: not one window to evaluate")
  batches = [np.stack(g) for g in inputs.groups(windows, batch_size)]
  d = net.d

  def kept(acts):   # [B, T] bool: rows the SAE is scored on and spliced into
    flat = acts.reshape(-1, d)
    if not np.isfinite(flat).all():   # the dump refuses such rows too
      raise EvaluateError(f"{int((~np.isfinite(flat).all(axis=1)).sum())} rows of block {layer}'s "
                          "output hold NaN or inf (try --compute_dtype=float32)")
    mask = ~inputs.massive_rows(flat, massive_ratio) if filter_massive else np.ones(len(flat), bool)
    return mask.reshape(acts.shape[:2])

  # Pass 1: the mean activation over the kept rows (for mean ablation and the FVU's denominator).
  total, rows = np.zeros(d, np.float64), 0
  for toks in tqdm.tqdm(batches, desc="mean", disable=not progress):
    acts = net(toks)
    keep = kept(acts)
    total += acts[keep].sum(axis=0, dtype=np.float64)
    rows += int(keep.sum())
  if not rows:
    raise EvaluateError("every evaluated row is massive: nothing to splice (--filter_massive=false?)")
  mean = torch.from_numpy((total / rows).astype(np.float32)).to(net.device)

  # Pass 2: the clean, zero- and mean-ablated runs of every batch, and each SAE's spliced run.
  tsaes = [TorchSae(sae, net.device) for sae in saes]
  shared = dict.fromkeys(("ce_clean", "ce_zero", "ce_mean"), 0.0)
  per = [{"ce_spliced": 0.0, "kl": 0.0, "err": 0.0, "nonzero": 0,
          "fires": torch.zeros(sae.n, dtype=torch.int64, device=net.device)} for sae in saes]
  var, massive = 0.0, 0
  for toks in tqdm.tqdm(batches, desc="evaluate", disable=not progress):
    ids = torch.from_numpy(toks.astype(np.int64)).to(net.device)
    clean, acts = net.logits(toks)
    shared["ce_clean"] += _next_token_stats(clean, ids)[0]
    keep = torch.from_numpy(kept(acts.cpu().numpy())).to(net.device)
    massive += int((~keep).sum())
    x = acts[keep]
    var += float(((x - mean) ** 2).sum(dtype=torch.float64))
    for name, replacement in (("zero", torch.where(keep[..., None], 0.0, acts)),
                              ("mean", torch.where(keep[..., None], mean, acts))):
      logits, _ = net.logits(toks, lambda out, r=replacement: r)
      shared["ce_" + name] += _next_token_stats(logits, ids)[0]
      del logits
    for tsae, s in zip(tsaes, per):
      x_hat, f, nz = tsae(x)
      s["fires"] += f
      s["nonzero"] += nz
      s["err"] += float(((x - x_hat) ** 2).sum(dtype=torch.float64))
      spliced = acts.clone()
      spliced[keep] = x_hat
      logits, _ = net.logits(toks, lambda out, r=spliced: r)
      ce, kl = _next_token_stats(logits, ids, clean)
      s["ce_spliced"] += ce
      s["kl"] += kl
      del logits, spliced
    del clean
  predictions = len(windows) * (seq_len - 1)
  base = {key: value / predictions for key, value in shared.items()}
  gap = base["ce_zero"] - base["ce_clean"]   # 0 only if zeroing the layer changes nothing at all
  results = []
  for sae, name, s, sae_notes in zip(saes, names, per, notes):
    r = dict(base, ce_spliced=s["ce_spliced"] / predictions, kl=s["kl"] / predictions)
    freq = s["fires"].cpu().numpy() / rows
    r.update(loss_recovered=(r["ce_zero"] - r["ce_spliced"]) / gap if gap else float("nan"),
             delta_loss=r["ce_spliced"] - r["ce_clean"], fvu=s["err"] / var,
             l0=s["nonzero"] / rows, dead_frac=float(np.mean(freq == 0)),
             dense_frac=float(np.mean(freq > dense_freq)), tokens=len(windows) * seq_len)
    results.append({
        **{key: r[key] for key in KEYS},
        "predictions": predictions, "sae_rows": rows, "massive_rows": massive,
        "filter_massive": filter_massive, "massive_ratio": massive_ratio,
        "dense_freq": dense_freq, "freq_hist": frequency_histogram(freq, rows),
        "model": model, "layer": layer, "hook": net.hook_name, "sae": name,
        "sae_kind": sae.kind, "sae_step": sae.meta.get("steps"), "d": sae.d, "n": sae.n,
        "k": sae.k, "input_scale": sae.input_scale, "seq_len": seq_len,
        "batch_size": batch_size, "windows": len(windows), "text": text,
        "compute_dtype": compute_dtype, "notes": sae_notes, "jaxsae_version": _version()})
  return results


def frequency_histogram(freq: np.ndarray, rows: int) -> dict:
  """Latents per tenth of a decade of firing frequency, from 1/rows (one firing) to 1; dead
  latents (frequency 0, no logarithm) are counted apart."""
  low = np.floor(np.log10(1.0 / rows))
  edges = np.round(np.linspace(low, 0.0, int(round(-low * 10)) + 1), 6)
  counts, _ = np.histogram(np.log10(freq[freq > 0]), bins=edges)
  return {"log10_edges": edges.tolist(), "counts": counts.tolist(), "dead": int(np.sum(freq == 0))}


def _version() -> str:
  try:
    return importlib.metadata.version("jaxsae")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def table(r: dict) -> str:
  lines = [f"{r['sae']} ({r['sae_kind']}, d={r['d']} n={r['n']} k={r['k']}) at {r['hook']} of "
           f"{r['model']}",
           f"{r['tokens']:,} tokens in {r['windows']} windows of {r['seq_len']}; "
           f"{r['predictions']:,} next-token predictions",
           "",
           f"  {'CE clean':18s} {r['ce_clean']:10.4f}",
           f"  {'CE spliced':18s} {r['ce_spliced']:10.4f}   delta loss {r['delta_loss']:+.4f}",
           f"  {'CE zero-ablated':18s} {r['ce_zero']:10.4f}",
           f"  {'CE mean-ablated':18s} {r['ce_mean']:10.4f}",
           f"  {'loss recovered':18s} {r['loss_recovered']:10.4f}",
           f"  {'KL(clean||spliced)':18s} {r['kl']:10.4f}   nats per token",
           f"  {'FVU':18s} {r['fvu']:10.4f}",
           f"  {'L0':18s} {r['l0']:10.2f}",
           f"  {'dead latents':18s} {100 * r['dead_frac']:9.2f}%   (no firing on any token)",
           f"  {'dense latents':18s} {100 * r['dense_frac']:9.2f}%   (firing on > "
           f"{100 * r['dense_freq']:g}% of tokens)",
           ""]
  if r["filter_massive"]:
    lines.append(f"{r['massive_rows']:,} of {r['tokens']:,} positions massive (norm > "
                 f"{r['massive_ratio']:g}x their batch's median, dropped by the dump): kept clean "
                 "in every run and left out of FVU, L0 and the latent counts")
  else:
    lines.append("every position spliced (--filter_massive=false)")
  lines += [f"note: {n}" for n in r["notes"]]
  return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags():
  """Only when run as a command (imported by tests, the flags of jaxsae.dump would clash)."""
  flags.DEFINE_string("sae", None, "jaxsae workdir, jaxsae export, or a SAELens/sparsify SAE folder.")
  flags.DEFINE_integer("step", -1, "Checkpoint step of a workdir; -1: the newest.")
  flags.DEFINE_string("model", None, "HF model folder or .gguf file on disk (as jaxsae.dump).")
  flags.DEFINE_integer("layer", None, "Block whose output the SAE reads (as jaxsae.dump).")
  flags.DEFINE_string("text", "", "Comma-separated text files, globs or folders (as jaxsae.dump).")
  flags.DEFINE_integer("tokens", 0, "Tokens to evaluate, rounded up to whole windows; 0: all.")
  flags.DEFINE_integer("seq_len", 1024, "Tokens per window.")
  flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
  flags.DEFINE_string("device", "auto", "torch device: auto | cpu | cuda | cuda:N.")
  flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "LM compute dtype.")
  flags.DEFINE_boolean("filter_massive", None, "Leave massive rows unspliced, as the dump drops "
                       "them; default: what the SAE's run records, else true.")
  flags.DEFINE_float("massive_ratio", None, "Massive above this x the batch's median norm; default: "
                     "the SAE's run's, else 10.")
  flags.DEFINE_float("dense_freq", 0.1, "A latent firing on more than this fraction is dense.")
  flags.DEFINE_boolean("allow_other_model", False, "Evaluate even if the SAE records another model.")
  flags.DEFINE_string("json", "", "Also write every figure here as JSON.")
  flags.DEFINE_boolean("progress", True, "Show progress bars.")
  flags.mark_flags_as_required(["sae", "model", "layer"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    r = evaluate(FLAGS.sae, FLAGS.model, FLAGS.layer, FLAGS.text, FLAGS.tokens, FLAGS.seq_len,
                 FLAGS.batch_size, FLAGS.device, FLAGS.compute_dtype, FLAGS.step,
                 FLAGS.filter_massive, FLAGS.massive_ratio, FLAGS.dense_freq,
                 FLAGS.allow_other_model, FLAGS.progress)
  except (EvaluateError, sae_io.SaeError, DataError, OSError) as e:
    print(f"jaxsae.evaluate: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(table(r))
  if FLAGS.json:
    paths.write_text(FLAGS.json, json.dumps(r, indent=2))   # a local file or a gs:// object
    print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
