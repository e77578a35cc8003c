r"""Summarizes a run or an exported SAE, and shows what chosen latents fire on.

  python -m jaxsae.inspect PATH
  python -m jaxsae.inspect PATH --store=STORE [--latents=3,17] [--tokenizer=TOK] [--top=10]
      [--max_rows=200000] [--html=latents.html]

PATH is a training workdir (local or gs://), a sweep's (its members' table) or an export (a saelens/sparsify folder, or a .npz;
local). The summary gives the config, step, tokens, last metrics and the fraction of dead latents.
With --store (an activation store from `python -m jaxsae.dump`, with token ids), the SAE encodes the
store's first --max_rows rows and lists each chosen latent's firing frequency and top-activating
tokens in their context. Without --latents it shows the --frequent latents that fire most often and
--random others that fire (drawn with --seed, so a rerun shows the same ones). Token ids are
decoded by --tokenizer (a tokenizer.json, an HF folder or a .gguf), by default the store's model
when that path exists; without one the ids are printed.

Run it as `python -m jaxsae.inspect` (a script inside jaxsae/ named inspect.py would shadow the
standard library's `inspect` if run by path).
"""
import base64
import dataclasses
import html
import json
import os
import sys

import numpy as np
from absl import app, flags

from jaxsae import checkpoint_layout, paths, sae_io

CONTEXT_BEFORE, CONTEXT_AFTER = 12, 3
BLOCK_FLOATS = 16 << 20   # pre-activations computed per block of store rows (64 MiB of float32)


class InspectError(ValueError):
  pass


# ---- loading a run or an export --------------------------------------------------------------

def _read_workdir(path: str, step: int, with_weights: bool):
  reader = checkpoint_layout.StepReader(path, step)
  meta = reader.describe()
  sae = sae_io.from_reader(reader) if with_weights else None
  # Dead latents: the counters of tokens since each latent last fired, saturating at the window.
  since = reader.read("since_fired")
  window = int(reader.config["sae"]["dead_tokens"])
  meta["dead_frac"] = float(np.mean(since >= window))
  meta["dead_window_tokens"] = window
  meta["steps_saved"] = checkpoint_layout.complete_steps(
      checkpoint_layout.checkpoint_dir(path))
  last = _last_metrics(paths.join(path, "metrics.jsonl"))
  if last:
    meta["metrics"] = last
  return sae, meta, reader.config


def _last_metrics(path: str) -> dict:
  last = {}
  for line in (paths.read_text(path) or "").splitlines():
    try:
      last = json.loads(line)
    except ValueError:   # a line cut short by a kill
      pass
  return last


def load(path: str, step: int = -1, with_weights: bool = False):
  """(Sae or None, metadata, config) of a workdir or an export."""
  if paths.of(checkpoint_layout.checkpoint_dir(path)).is_dir():
    return _read_workdir(path, step, with_weights)
  if path.endswith(".npz") or paths.of(paths.join(path, "cfg.json")).exists():
    sae = sae_io.load(path)
    return sae, sae.meta, sae.cfg
  raise InspectError(f"{path} is neither a workdir (no checkpoints/) nor an export (no cfg.json)")


# ---- summary ----------------------------------------------------------------------------------

def summary(meta: dict, config: dict) -> str:
  lines = [f"model       {meta.get('model') or '?'}  hook {meta.get('hook') or '?'}",
           f"SAE         d={meta.get('d')} n={meta.get('n')} k={meta.get('k')}  "
           f"input scale {meta.get('input_scale', 1.0):.6g}",
           f"trained     step {meta.get('steps')}, {int(meta.get('tokens', 0)):,} tokens"
           + (f" (jaxsae {meta['jaxsae_version']})" if meta.get("jaxsae_version") else "")]
  if "steps_saved" in meta:
    lines.append(f"checkpoints {', '.join(map(str, meta['steps_saved']))}")
  if "dead_frac" in meta:
    lines.append(f"dead        {100 * meta['dead_frac']:.2f}% of latents (no firing in the last "
                 f"{meta['dead_window_tokens']:,} tokens)")
  metrics = meta.get("metrics") or {}
  if metrics:
    lines.append(f"metrics     (step {metrics.get('step', '?')})")
    lines += [f"  {key:28s} {value:.6g}" if isinstance(value, (int, float)) else
              f"  {key:28s} {value}" for key, value in sorted(metrics.items()) if key != "step"]
  if config:
    t, dc = config.get("train", {}), config.get("data", {})
    lines.append(f"config      data {dc.get('source')} {dc.get('path') or ''}  batch "
                 f"{t.get('batch_size')}  lr {config.get('resolved', {}).get('lr', t.get('lr'))}  "
                 f"steps {t.get('steps')}  mesh {config.get('resolved', {}).get('mesh_shape')}")
  return "\n".join(lines)


# ---- top-activating contexts ------------------------------------------------------------------

@dataclasses.dataclass
class Latent:
  """One latent's top-activating rows among the scanned ones, and how often it fires there."""
  index: int
  fires: int        # scanned rows it fires on
  rows: int         # rows scanned
  top: list         # [(activation, row), ...] best first
  why: str = ""     # how it was chosen when --latents was not given

  def heading(self) -> str:
    why = f" ({self.why})" if self.why else ""
    return (f"latent {self.index}{why}: fires on {100 * self.fires / max(self.rows, 1):.3g}% of "
            f"{self.rows:,} rows; {len(self.top)} top activations")


def _encoded(sae: sae_io.SaeWeights, store, max_rows: int):
  """(first row, [rows, n] codes) for blocks of the store's first max_rows rows."""
  rows_total = min(store.rows, max_rows)
  block = max(1, BLOCK_FLOATS // sae.n)
  for start in range(0, rows_total, block):
    yield start, sae.encode_dense(store.read(start, min(start + block, rows_total)))


def firing_counts(sae: sae_io.SaeWeights, store, max_rows: int) -> np.ndarray:
  """[n]: how many of the store's first max_rows rows each latent fires on."""
  counts = np.zeros(sae.n, np.int64)
  for _, z in _encoded(sae, store, max_rows):
    counts += np.count_nonzero(z > 0, axis=0)
  return counts


def default_latents(counts: np.ndarray, frequent: int, random: int, seed: int) -> dict:
  """{latent: why}: the `frequent` latents that fire most often, then `random` others drawn with
  `seed` among those that fire at all (a dead latent has no contexts to show)."""
  order = np.argsort(-counts, kind="stable")   # ties: the lower index first, so runs agree
  chosen = {int(j): "most frequent" for j in order[:frequent] if counts[j] > 0}
  live = np.setdiff1d(np.flatnonzero(counts > 0), list(chosen))
  drawn = np.random.default_rng(seed).choice(live, size=min(random, len(live)), replace=False)
  return {**chosen, **{int(j): "random" for j in sorted(drawn)}}


def top_examples(sae: sae_io.SaeWeights, store, latents: list[int], top: int,
                 max_rows: int) -> list[Latent]:
  """Each latent's `top` best rows among the store's first max_rows rows, and its firing count."""
  n = sae.w_enc.shape[1]
  bad = [j for j in latents if not 0 <= j < n]
  if bad:
    raise InspectError(f"--latents {bad} out of range: the SAE has n={n} latents")
  acts = {j: np.zeros(0, np.float32) for j in latents}
  rows = {j: np.zeros(0, np.int64) for j in latents}
  fires = dict.fromkeys(latents, 0)
  for start, z in _encoded(sae, store, max_rows):
    for j in latents:
      hit = np.flatnonzero(z[:, j] > 0)
      fires[j] += len(hit)
      a, r = np.concatenate([acts[j], z[hit, j]]), np.concatenate([rows[j], hit + start])
      keep = np.argsort(-a, kind="stable")[:top]
      acts[j], rows[j] = a[keep], r[keep]
  scanned = min(store.rows, max_rows)
  return [Latent(j, fires[j], scanned, list(zip(acts[j].tolist(), rows[j].tolist())))
          for j in latents]


def load_tokenizer(spec: str):
  """A callable id -> text, from a tokenizer.json, an HF folder or a .gguf."""
  if spec.endswith(".json"):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(spec)
    return lambda i: tok.decode([int(i)], skip_special_tokens=False)
  import transformers
  if spec.endswith(".gguf"):
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(spec)),
                                                     gguf_file=os.path.basename(spec),
                                                     local_files_only=True)
  else:
    tok = transformers.AutoTokenizer.from_pretrained(spec, local_files_only=True)
  return lambda i: tok.decode([int(i)])


def context(store, row: int, decode):
  """(tokens before, the token, tokens after) of a row, staying inside its document."""
  lo, hi = max(0, row - CONTEXT_BEFORE), min(store.rows, row + CONTEXT_AFTER + 1)
  toks = store.read(lo, hi, "tokens")
  keep = np.ones(hi - lo, bool)
  if "doc_ids" in store.columns:
    keep = store.read(lo, hi, "doc_ids") == store.read(row, row + 1, "doc_ids")[0]
  pieces = [decode(t) if ok else None for t, ok in zip(toks, keep)]
  at = row - lo
  join = lambda xs: "".join(x for x in xs if x is not None)
  return join(pieces[:at]), pieces[at], join(pieces[at + 1:])


def render_text(examples: list[Latent], store, decode) -> str:
  out = []
  for latent in examples:
    out.append(latent.heading())
    for value, row in latent.top:
      before, tok, after = context(store, row, decode)
      out.append(f"  {value:9.3f}  row {row:>9}  {before!r} [[{tok}]] {after!r}"
                 .replace("\\n", "\u21b5"))
  return "\n".join(out)


def render_html(examples: list[Latent], store, decode, title: str, about: str = "",
                images=()) -> str:
  """The page: the summary `about`, the PNGs `images` (embedded, so the page travels alone; from
  `python -m jaxsae.plot`), and each latent's top-activating contexts."""
  parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif} .c{font-family:monospace;white-space:pre-wrap}"
           " mark{background:#fb4;font-weight:bold} figure{display:inline-block;margin:4px}"
           "</style>", f"<h1>{html.escape(title)}</h1>"]
  if about:
    parts.append(f"<pre>{html.escape(about)}</pre>")
  for image in images:
    data = base64.b64encode(paths.of(image).read_bytes()).decode()
    name = html.escape(paths.of(image).name)
    parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{name}">'
                 f"<figcaption>{name}</figcaption></figure>")
  for latent in examples:
    parts.append(f"<h2>{html.escape(latent.heading())}</h2><table>")
    for value, row in latent.top:
      before, tok, after = context(store, row, decode)
      parts.append(f"<tr><td>{value:.3f}</td><td class=c>{html.escape(before)}<mark>"
                   f"{html.escape(tok)}</mark>{html.escape(after)}</td></tr>")
    parts.append("</table>")
  return "\n".join(parts)


# ---- command line -----------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_integer("step", -1, "Checkpoint step of a workdir; -1: the latest.")
  flags.DEFINE_string("store", "", "Activation store with token ids, for top-activating contexts.")
  flags.DEFINE_list("latents", [], "Latents whose top-activating contexts are listed; default: "
                    "the --frequent most often firing and --random others that fire.")
  flags.DEFINE_integer("frequent", 5, "Without --latents: how many of the most often firing "
                       "latents to show.")
  flags.DEFINE_integer("random", 5, "Without --latents: how many others to show, drawn among the "
                       "latents that fire at all.")
  flags.DEFINE_integer("seed", 0, "Seed of the --random draw (the same seed, the same latents).")
  flags.DEFINE_string("tokenizer", "", "tokenizer.json, HF folder or .gguf; default: the store's "
                      "model when that path exists.")
  flags.DEFINE_integer("top", 10, "Contexts per latent.")
  flags.DEFINE_integer("max_rows", 200_000, "Store rows encoded (from the start).")
  flags.DEFINE_string("html", "", "Also write an HTML page here: the summary, the pictures of "
                      "--plots, and the contexts.")
  flags.DEFINE_string("plots", "", "PNGs put in the --html page; default PATH/plots (where "
                      "`python -m jaxsae.plot PATH` writes them).")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m jaxsae.inspect PATH [--store=... --latents=...]")
  path = argv[1]
  from jaxsae import sweep
  if sweep.read_state(path) is not None:   # a sweep: its members' table (inspect each member's
    print(sweep.summary_table(path))       # own folder, PATH/members/<name>, for the rest)
    return
  try:
    latents = [int(x) for x in FLAGS.latents]
    sae, meta, config = load(path, FLAGS.step, with_weights=bool(FLAGS.store))
    about = summary(meta, config)
    print(about)
    examples, store, decode = [], None, None
    if FLAGS.store:
      from jaxsae.data.store import Store   # only now: tensorstore + the store format
      store = Store(FLAGS.store)
      if "tokens" not in store.columns:
        raise InspectError(f"{FLAGS.store} holds no token ids (dump it with --tokens-npy or a "
                           "model)")
      if store.d != sae.d:
        raise InspectError(f"{FLAGS.store} holds d={store.d}; the SAE takes d={sae.d}")
      spec = FLAGS.tokenizer or (store.metadata.get("info") or {}).get("model", "")
      decode = load_tokenizer(spec) if spec and os.path.exists(spec) else \
          (lambda i: f"<{int(i)}>")
      why = {}
      if not latents:   # one more pass over the rows: which latents fire, how often
        why = default_latents(firing_counts(sae, store, FLAGS.max_rows), FLAGS.frequent,
                              FLAGS.random, FLAGS.seed)
        latents = list(why)
      examples = top_examples(sae, store, latents, FLAGS.top, FLAGS.max_rows)
      for latent in examples:
        latent.why = why.get(latent.index, "")
      print()
      if why:
        drawn = sum(v == "random" for v in why.values())
        print(f"no --latents: the {len(why) - drawn} most often firing and {drawn} random others "
              f"that fire (--seed={FLAGS.seed})")
      print(render_text(examples, store, decode))
    if FLAGS.html:
      plots = FLAGS.plots or paths.join(path, "plots")
      images = sorted(paths.join(plots, p.name) for p in paths.of(plots).glob("*.png"))
      with paths.of(FLAGS.html).open("w") as f:
        f.write(render_html(examples, store, decode, f"{path}", about, images))
      print(f"wrote {FLAGS.html}" + (f" ({len(images)} pictures from {plots})" if images else ""))
  except (InspectError, checkpoint_layout.CheckpointNotFound, sae_io.SaeError, OSError,
          ValueError) as e:
    print(f"jaxsae.inspect: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
