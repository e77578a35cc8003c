r"""Dumps activations into an activation store (see jaxsae/data/store.py).

From a Hugging Face causal LM (needs the [dump] extra), the output of block L on text files:

  python -m jaxsae.dump --model=PATH --layer=L --text=FILES --out=STORE --tokens=N

PATH is an HF folder or a .gguf file on disk. FILES: comma-separated files, globs or folders; a
.txt file is one document, each line of a .jsonl file one {"text": ...} document. Documents are
joined with EOS between them and cut into --seq_len windows, --batch_size windows per forward.

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
from absl import app, flags, logging

from jaxsae.data import inputs
from jaxsae.data.source import DataError
from jaxsae.data.store import Layout, StoreWriter, numpy_dtype

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Store to write: a folder, or a TensorStore URL (gs://b/dir).")
flags.DEFINE_string("model", "", "HF model folder or .gguf file on disk.")
flags.DEFINE_integer("layer", -1, "Block whose output is stored (0-based, resid_post of block L).")
flags.DEFINE_string("text", "", "Comma-separated text files, globs or folders.")
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


def keep_rows(acts: np.ndarray, where: str) -> tuple[np.ndarray, int]:
  """(mask of rows to keep, massive rows dropped); raises on NaN/inf rows."""
  bad = int((~np.isfinite(acts).all(axis=1)).sum())
  if bad:
    raise DataError(f"{bad} of {len(acts)} rows in {where} hold NaN or inf; refusing to store them")
  keep = np.ones(len(acts), bool)
  if FLAGS.filter_massive:
    keep = ~inputs.massive_rows(acts, FLAGS.massive_ratio)
  return keep, int((~keep).sum())


def layout() -> Layout:
  return Layout(FLAGS.chunk_rows, FLAGS.shard_rows, FLAGS.compression)


def settings(*names) -> dict:
  """The flags that decide the store's content: a rerun must repeat them to resume."""
  return {n: FLAGS[n].value for n in names + ("tokens", "filter_massive", "massive_ratio")}


def run(writer: StoreWriter, batches, total: int, unit: str, store_dtype: np.dtype):
  """The dump loop: batches of (acts, columns, where) -> filtered rows -> committed store."""
  state = dict({"batches": 0, "done": 0, "massive": 0}, **writer.state)
  bar = tqdm.tqdm(total=total or None, initial=state["done"], unit=unit, unit_scale=True,
                  disable=not FLAGS.progress, dynamic_ncols=True)
  start, first = time.time(), state["done"]
  for acts, columns, where in batches(state["batches"]):
    stored = acts.astype(store_dtype)
    keep, massive = keep_rows(stored, where)   # checked after casting: float16 may overflow
    writer.append(stored[keep], **{k: v[keep] for k, v in columns.items()})
    state["batches"] += 1
    state["done"] += len(acts)
    state["massive"] += massive
    bar.update(len(acts))
    if writer.should_commit():
      writer.commit(dict(state), filtered={"massive": state["massive"]})
  bar.close()
  writer.finish(dict(state), filtered={"massive": state["massive"]}, input_rows=state["done"])
  rate = (state["done"] - first) / max(time.time() - start, 1e-9)
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
      yield x, cols, f"{FLAGS.from_npy} rows {b * block}-{b * block + len(x)}"

  run(writer, batches, rows, "rows", numpy_dtype(out_dtype))


def from_model():
  from jaxsae.data import lm   # torch and transformers only when a model runs
  if not FLAGS.text:
    raise DataError("--model needs --text (the files to run it on)")
  files = inputs.expand_files(FLAGS.text)
  net = lm.BlockOutput(FLAGS.model, FLAGS.layer, FLAGS.device, FLAGS.compute_dtype, FLAGS.save_hf)
  out_dtype = FLAGS.dtype or "bfloat16"
  tok = net.tokenizer
  info = {"source": "model", "model": FLAGS.model, "layer": FLAGS.layer, "hook": net.hook_name,
          "tokenizer": getattr(tok, "name_or_path", "") or type(tok).__name__,
          "vocab_size": len(tok), "separator": net.separator(), "files": files,
          **settings("model", "layer", "text", "seq_len", "batch_size", "compute_dtype", "dtype")}
  columns = {"tokens": "int32", "doc_ids": "int32", "positions": "int32"}
  writer = StoreWriter(FLAGS.out, net.d, out_dtype, columns, layout(), info)
  if writer.complete:
    print(f"{FLAGS.out} is already complete ({writer.rows} rows)")
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
      yield net(toks).reshape(-1, net.d), cols, f"windows {b * B}-{b * B + len(group)}"

  run(writer, batches, (max_windows or 0) * T, "tok", numpy_dtype(out_dtype))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  if bool(FLAGS.from_npy) == bool(FLAGS.model):
    raise app.UsageError("give exactly one of --model (with --layer and --text) or --from_npy")
  try:
    from_npy() if FLAGS.from_npy else from_model()
  except DataError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _parse(argv):
  """absl flags, with --from-npy spelled as in the docs accepted for --from_npy (and so on)."""
  fixed = [a if not a.startswith("--") else "--" + a[2:].split("=", 1)[0].replace("-", "_")
           + ("=" + a.split("=", 1)[1] if "=" in a else "") for a in argv[1:]]
  return FLAGS([argv[0]] + fixed)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
