r"""Dumps activations into an activation store (see jaxsae/data/store.py).

From a Hugging Face causal LM (needs the [dump] extra), the output of block L on text files:

  python -m jaxsae.dump --model=PATH --layer=L --text=FILES --out=STORE --tokens=N

PATH is an HF folder or a .gguf file on disk. FILES: comma-separated files, globs or folders; a
.txt file is one document, each line of a .jsonl file one {"text": ...} document. Documents are
joined with EOS between them and cut into --seq_len windows, --batch_size windows per forward.

For a transcoder (input -> output of block L's MLP), one pass writes both sides:

  python -m jaxsae.dump --model=PATH --layer=L --text=FILES --hooks=mlp_in,mlp_out --out=DIR

--hooks picks among resid_post (block L's output, the default), mlp_in (what block L's `mlp` module
receives, after the pre-MLP norm) and mlp_out (what it returns, before the residual add). With
several, --out is a folder of one store per hook (DIR/mlp_in, DIR/mlp_out) holding the same rows in
the same order: a row massive in any hook is dropped from all, and the stores commit at the same
batches (after a kill between two of those commits, the rerun realigns them).

From existing arrays ([rows, d] activations, optional [rows] token ids):

  python -m jaxsae.dump --from-npy=acts.npy [--tokens-npy=tokens.npy] --out=STORE

Rows whose norm exceeds --massive_ratio x the median norm of their batch ("massive activations":
first positions, separators) are dropped and counted, unless --filter_massive=false. Rows with NaN or
inf stop the dump with a count. Rerunning a killed dump with the same flags continues where its
last commit stopped; the store is marked complete only at the end. Flags take - or _.
"""
import sys
import time

import numpy as np
import tqdm
from absl import app, flags

from jaxsae import paths
from jaxsae.data import inputs
from jaxsae.data.source import DataError
from jaxsae.data.store import Layout, StoreWriter, numpy_dtype

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Store to write: a folder, or a TensorStore URL (gs://b/dir).")
flags.DEFINE_string("model", "", "HF model folder or .gguf file on disk.")
flags.DEFINE_integer("layer", -1, "Block L whose --hooks are stored (0-based).")
flags.DEFINE_string("text", "", "Comma-separated text files, globs or folders.")
flags.DEFINE_list("hooks", ["resid_post"], "Hook points of block L to store, comma-separated: "
                  "resid_post | mlp_in | mlp_out. Several: --out is a folder of a store for each.")
flags.DEFINE_integer("tokens", 0, "Tokens (rows before filtering) to dump; 0: all the input. "
                     "Rounded up to whole windows.")
flags.DEFINE_integer("seq_len", 1024, "Tokens per window (the model's context per forward).")
flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
flags.DEFINE_string("device", "auto", "torch device: auto | cpu | cuda | cuda:N.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                  "LM compute: float32, or bfloat16 autocast (~2.5x faster on CPU, ~0.7% off).")
flags.DEFINE_string("save_hf", "", "Also save the loaded model as a plain HF folder here (a GGUF "
                    "is dequantized on every load; the folder loads ~10x faster).")
flags.DEFINE_string("from_npy", "", "Ingest this [rows, d] .npy file instead of running a model.")
flags.DEFINE_string("tokens_npy", "", "With --from_npy: the [rows] token ids of its rows.")
flags.DEFINE_integer("npy_block_rows", 65536, "With --from_npy: rows read (and filtered) at once.")
flags.DEFINE_string("dtype", "", "Stored dtype: float32 | bfloat16 | float16; '': bfloat16 for a "
                    "model, the array's own dtype for --from_npy.")
flags.DEFINE_integer("chunk_rows", 4096, "Rows per chunk (the loader's read and shuffle unit).")
flags.DEFINE_integer("shard_rows", 65536, "Rows per shard file (a multiple of chunk_rows); also "
                     "how often progress is committed.")
flags.DEFINE_enum("compression", "none", ["none", "lz4", "zstd"], "Chunk compression.")
flags.DEFINE_bool("filter_massive", True, "Drop rows with massive norms (counted in metadata).")
flags.DEFINE_float("massive_ratio", 10.0, "A row is massive above this x its batch's median norm.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def keep_rows(acts: dict, where: str) -> tuple[np.ndarray, int]:
  """(mask of rows to keep, massive rows dropped) for rows aligned across the stores in `acts`
  ({name: [rows, d]}): a row massive in any of them is dropped from all, so they stay aligned.
  Raises on NaN/inf rows."""
  keep = np.ones(len(next(iter(acts.values()))), bool)
  for name, x in acts.items():
    bad = int((~np.isfinite(x).all(axis=1)).sum())
    if bad:
      at = f"{where} ({name})" if len(acts) > 1 else where
      raise DataError(f"{bad} of {len(x)} rows in {at} hold NaN or inf; refusing to store them")
    if FLAGS.filter_massive:
      keep &= ~inputs.massive_rows(x, FLAGS.massive_ratio)
  return keep, int((~keep).sum())


def layout() -> Layout:
  return Layout(FLAGS.chunk_rows, FLAGS.shard_rows, FLAGS.compression)


def settings(*names) -> dict:
  """The flags that decide the store's content: a rerun must repeat them to resume."""
  return {n: FLAGS[n].value for n in names + ("tokens", "filter_massive", "massive_ratio")}


def run(writers: dict, batches, total: int, unit: str, store_dtype: np.dtype):
  """The dump loop: batches of ({name: acts}, columns, where) -> the rows kept in all of them ->
  one committed store per name (writers: {name: StoreWriter}), row-aligned.

  The stores see the same rows, so they commit at the same batches and their resume states agree,
  except after a kill between two of their commits: the pass then restarts at the earliest state
  and a store ahead skips the batches it holds already, which keeps the stores aligned."""
  states = {name: dict({"batches": 0, "done": 0, "massive": 0}, **w.state)
            for name, w in writers.items()}
  first = min(s["batches"] for s in states.values())
  done_before = min(s["done"] for s in states.values())
  bar = tqdm.tqdm(total=total or None, initial=done_before, unit=unit, unit_scale=True,
                  disable=not FLAGS.progress, dynamic_ncols=True)
  start = time.time()
  for b, (acts, columns, where) in enumerate(batches(first), first):
    stored = {name: x.astype(store_dtype) for name, x in acts.items()}
    keep, massive = keep_rows(stored, where)   # checked after casting: float16 may overflow
    for name, writer in writers.items():
      state = states[name]
      if state["batches"] > b:   # this store committed the batch before the kill
        continue
      writer.append(stored[name][keep], **{k: v[keep] for k, v in columns.items()})
      state.update(batches=b + 1, done=state["done"] + len(keep),
                   massive=state["massive"] + massive)
      if writer.should_commit():
        writer.commit(dict(state), filtered={"massive": state["massive"]})
    bar.update(len(keep))
  bar.close()
  rate = (max(s["done"] for s in states.values()) - done_before) / max(time.time() - start, 1e-9)
  for name, writer in writers.items():
    state = states[name]
    if not writer.complete:   # a store finished before a kill is left as it is
      writer.finish(dict(state), filtered={"massive": state["massive"]}, input_rows=state["done"])
    print(f"{writer.path}: complete, {writer.rows} rows of d={writer.d} {writer.dtype} "
          f"({state['massive']} massive rows dropped; {rate:,.0f} {unit}/s this run)")


def from_npy():
  acts = inputs.NpyReader(FLAGS.from_npy)
  shape = acts.shape
  if len(shape) != 2:
    raise DataError(f"{FLAGS.from_npy}: shape {shape}; expected [rows, d]")
  rows = min(shape[0], FLAGS.tokens) if FLAGS.tokens else shape[0]
  toks = inputs.NpyReader(FLAGS.tokens_npy) if FLAGS.tokens_npy else None
  if toks and toks.shape != shape[:1]:
    raise DataError(f"{FLAGS.tokens_npy}: shape {toks.shape}; expected ({shape[0]},) to match "
                    f"{FLAGS.from_npy}")
  out_dtype = FLAGS.dtype or str(acts.dtype)
  columns = {"tokens": "int32"} if toks else {}
  info = {"source": "npy", "shape": list(shape), "input_dtype": str(acts.dtype),
          **settings("from_npy", "tokens_npy", "npy_block_rows", "dtype")}
  writer = StoreWriter(FLAGS.out, shape[1], out_dtype, columns, layout(), info)
  if writer.complete:
    print(f"{FLAGS.out} is already complete ({writer.rows} rows)")
    return
  block = FLAGS.npy_block_rows

  def batches(start_block):
    tok_blocks = toks.blocks(block, start_block, rows) if toks else None
    for b, x in enumerate(acts.blocks(block, start_block, rows), start_block):
      cols = {"tokens": next(tok_blocks).astype(np.int32)} if toks else {}
      yield {"acts": x}, cols, f"{FLAGS.from_npy} rows {b * block}-{b * block + len(x)}"

  run({"acts": writer}, batches, rows, "rows", numpy_dtype(out_dtype))


def from_model():
  from jaxsae.data import lm   # torch and transformers only when a model runs
  if not FLAGS.text:
    raise DataError("--model needs --text (the files to run it on)")
  hooks = lm.check_hooks(FLAGS.hooks)   # before the model loads
  files = inputs.expand_files(FLAGS.text)
  net = lm.BlockOutput(FLAGS.model, FLAGS.layer, FLAGS.device, FLAGS.compute_dtype, FLAGS.save_hf,
                       hooks=hooks)
  out_dtype = FLAGS.dtype or "bfloat16"
  columns = {"tokens": "int32", "doc_ids": "int32", "positions": "int32"}
  writers = {h: StoreWriter(store_path(h, hooks), net.d, out_dtype, columns, layout(),
                            model_info(net, files, h, hooks)) for h in hooks}
  if all(w.complete for w in writers.values()):
    print(f"{FLAGS.out} is already complete ({writers[hooks[0]].rows} rows)")
    return
  T, B = FLAGS.seq_len, FLAGS.batch_size
  max_windows = -(-FLAGS.tokens // T) if FLAGS.tokens else None

  def batches(start_batch):
    for b, group in enumerate(inputs.groups(net.windows(files, T, FLAGS.tokens), B)):
      if b < start_batch:   # in the store already: tokenized again, but not run
        continue
      toks = np.stack([w[0] for w in group])
      cols = {"tokens": toks.ravel(), "doc_ids": np.stack([w[1] for w in group]).ravel(),
              "positions": np.tile(np.arange(T, dtype=np.int32), len(group))}
      acts = {h: x.reshape(-1, net.d) for h, x in net.capture(toks).items()}
      yield acts, cols, f"windows {b * B}-{b * B + len(group)}"

  run(writers, batches, (max_windows or 0) * T, "tok", numpy_dtype(out_dtype))


def store_path(hook: str, hooks: tuple) -> str:
  """--out itself for one hook; else --out/HOOK (a folder, or a URL prefix)."""
  return FLAGS.out if len(hooks) == 1 else paths.join(FLAGS.out, hook)


def model_info(net, files: list, hook: str, hooks: tuple) -> dict:
  """The info of hook's store. "hook" is its full name; unless --hooks is the default resid_post
  (whose stores stay as they were, so older ones still resume), also "hook_point" (its --hooks
  name) and "hooks" ({name: full name} of every store of the pass, this one included)."""
  tok = net.tokenizer
  info = {"source": "model", "model": FLAGS.model, "layer": FLAGS.layer,
          "hook": net.hook_names[hook]}
  if hooks != ("resid_post",):
    info.update(hook_point=hook, hooks={h: net.hook_names[h] for h in hooks})
  return dict(info, tokenizer=getattr(tok, "name_or_path", "") or type(tok).__name__,
              vocab_size=len(tok), separator=net.separator(), files=files,
              **settings("model", "layer", "text", "seq_len", "batch_size", "compute_dtype",
                         "dtype"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  if bool(FLAGS.from_npy) == bool(FLAGS.model):
    raise app.UsageError("give exactly one of --model (with --layer and --text) or --from_npy")
  if FLAGS.from_npy and FLAGS.hooks != ["resid_post"]:
    raise app.UsageError("--hooks needs --model: --from_npy stores its one array")
  try:
    from_npy() if FLAGS.from_npy else from_model()
  except DataError as e:   # once, as the other commands do: not also as an absl log line
    print(f"jaxsae.dump: error: {e}", file=sys.stderr)
    sys.exit(2)


def _parse(argv):
  """absl flags, with --from-npy spelled as in the docs accepted for --from_npy (and so on)."""
  fixed = [a if not a.startswith("--") else "--" + a[2:].split("=", 1)[0].replace("-", "_")
           + ("=" + a.split("=", 1)[1] if "=" in a else "") for a in argv[1:]]
  return FLAGS([argv[0]] + fixed)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
