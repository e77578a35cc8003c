r"""Exports a checkpoint's SAE in the layouts the field's tools load (docs/design.md).

  python -m jaxsae.export --workdir=DIR [--step=N] --format=saelens|sparsify|npz \
      [--dtype=float32|bfloat16] --out=PATH

  saelens   PATH/ holds sae_weights.safetensors (W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d])
            and cfg.json; loads with sae_lens.SAE.load_from_disk(PATH) as a TopKSAE
  sparsify  PATH/ holds sae.safetensors (encoder.weight [n, d], encoder.bias [n], W_dec [n, d],
            b_dec [d]) and cfg.json; loads with sparsify.SparseCoder.load_from_disk(PATH)
  npz       PATH (a .npz) holds W_enc [d, n], W_dec [n, d], b_enc [n], b_dec [d], Gemma Scope's
            names and orientation (float32 only), and PATH minus .npz + .metadata.json beside it

A BatchTopK SAE (sae.architecture="batchtopk", or "matryoshka_batchtopk") is a JumpReLU at inference: z = pre where pre >
threshold, its running-average training threshold broadcast to every latent. It exports as
SAELens's "jumprelu" architecture (plus a threshold [n] tensor; no k) and as an npz with a threshold
[n] array (Gemma Scope's JumpReLU layout); sparsify's SparseCoder encodes k per row only, so that
format is refused for it.

jaxsae scales raw activations by a constant s before encoding (state.input_scale), and centres the
encoder's input on b_pre while the output's bias is b_dec (model.py); the tools' SAEs subtract
their one b_dec before encoding. An export takes and returns *raw* activations, so s is folded into
the weights and b_dec - b_pre into the encoder bias:

  pre = (x s - b_pre) W_enc^T + b_enc
      = (x - b_dec/s) (s W_enc^T) + (b_enc + W_enc (b_dec - b_pre))   -> encoder s W_enc, that bias
  x_hat / s = z (W_dec / s) + b_dec / s                               -> W_dec / s, b_dec / s

(A checkpoint saved before b_dec existed has b_pre in both roles: b_dec = b_pre.)

A transcoder (data.target_path) maps x to a target y scaled by its own t (state.target_scale),
and the tools' transcoders take x uncentred, so b_pre goes into the encoder bias:

  pre = x (s W_enc^T) + (b_enc - b_pre W_enc^T)                    -> b_enc - W_enc b_pre
  y_hat / t = z (W_dec / t) + b_dec / t [+ x (s/t) W_skip^T]       -> W_dec / t, b_dec / t, W_skip s/t

  saelens   "transcoder" layouts encode with ReLU or JumpReLU: a BatchTopK transcoder exports as
            "jumprelu_transcoder" ("jumprelu_skip_transcoder" with sae.skip; W_skip [d_out, d_in],
            d_out in cfg.json); a TopK one is refused (SAELens has no TopK transcoder)
  sparsify  transcode=true, skip_connection=sae.skip (W_skip [d, d]); sparsify's transcoders keep
            the input's width, so d_out must equal d
  npz       the same tensors, plus W_skip

Nothing here imports JAX or holds a whole matrix: the checkpoint's arrays are read through
TensorStore a block of latent rows at a time, folded, cast, and written straight to their place in
the output (a safetensors file is an 8-byte length, a JSON header and raw row-major bytes, so every
tensor's offset is known before any data is written), so a dictionary larger than host RAM exports.
Metadata (model, hook, d, n, k, steps, tokens, final metrics, jaxsae version) goes into the
safetensors header and cfg.json.
"""
import json
import os
import struct
import sys
import zipfile

import ml_dtypes
import numpy as np
from absl import app, flags

from jaxsae import paths
from jaxsae.checkpoint_layout import CheckpointNotFound, StepReader

FORMATS = ("saelens", "sparsify", "npz")
DTYPES = {"float32": (np.dtype(np.float32), "F32"), "bfloat16": (np.dtype(ml_dtypes.bfloat16), "BF16")}
BLOCK_BYTES = 64 << 20   # float32 bytes of latent rows read, folded and written at a time


class ExportError(ValueError):
  """Nothing to export, or an export that cannot be written; says what exists."""


class FoldedSae:
  """The exported SAE, in raw-activation units, produced a block of latent rows at a time."""

  def __init__(self, reader: StepReader, block_bytes: int = BLOCK_BYTES):
    self.d, self.n, self.d_out = reader.d, reader.n, reader.d_out
    self.transcoder = reader.transcoder
    self.s = np.float32(reader.input_scale())
    self.t = np.float32(reader.target_scale())   # the output's scale: s for an SAE
    self._w_enc, self._w_dec = reader.array("params.W_enc"), reader.array("params.W_dec")
    self._b_enc, self._b_pre = reader.array("params.b_enc"), reader.array("params.b_pre")
    self._b_dec = reader.array("params.b_dec") if reader.has_b_dec else None   # else b_pre is both
    self.skip = reader.skip
    self._w_skip = reader.array("params.W_skip") if reader.skip else None
    self.threshold = reader.threshold() if reader.has_threshold else None
    self.rows = max(1, block_bytes // (4 * max(self.d, self.d_out)))

  def _row_blocks(self, src):
    """(first row, rows) of a stored [n, *] matrix: whole stored chunks read (each decoded once),
    handed on in blocks of self.rows."""
    chunk = max(src.chunk_layout.read_chunk.shape[0] or self.rows, 1)
    for c in range(0, self.n, chunk):
      stored = src[c:min(c + chunk, self.n)].read().result()
      for a in range(0, len(stored), self.rows):
        yield c + a, stored[a:a + self.rows]
      del stored

  def blocks(self, which: str):
    """(first index, block) pieces of one exported tensor: rows [r, d] of W_enc / W_dec (in the
    stored [n, d] orientation, folded), slices of b_enc [n], and b_dec [d_out] and W_skip
    [d_out, d] in one piece."""
    if which == "b_enc" and self._b_dec is not None:   # b_enc + W_enc shift: the encoder rows
      b_pre = self._b_pre.read().result()
      shift = -b_pre if self.transcoder else self._b_dec.read().result() - b_pre
      for first, rows in self._row_blocks(self._w_enc):
        yield first, self._b_enc[first:first + len(rows)].read().result() + rows @ shift
    elif which in ("b_enc", "threshold"):
      step = self.rows * self.d   # the same byte budget
      for a in range(0, self.n, step):
        end = min(a + step, self.n)
        yield a, (self._b_enc[a:end].read().result() if which == "b_enc" else
                  np.full(end - a, self.threshold, np.float32))
    elif which == "b_dec":
      yield 0, (self._b_pre if self._b_dec is None else self._b_dec).read().result() / self.t
    elif which == "W_skip":
      yield 0, self._w_skip.read().result() * (self.s / self.t)
    else:
      for first, rows in self._row_blocks(self._w_enc if which == "W_enc" else self._w_dec):
        yield first, rows * self.s if which == "W_enc" else rows / self.t


# ---- writers ------------------------------------------------------------------------------------

def _shape(name, transposed, sae: FoldedSae):
  """Shape of an exported tensor; W_enc is [d, n] when transposed (SAELens, Gemma Scope)."""
  d, n, d_out = sae.d, sae.n, sae.d_out
  return {"W_enc": (d, n) if transposed else (n, d), "W_dec": (n, d_out), "b_enc": (n,),
          "b_dec": (d_out,), "threshold": (n,), "W_skip": (d_out, d)}[name]


def write_safetensors(path: str, sae: FoldedSae, tensors: list, dtype: str, metadata: dict):
  """Streams `tensors` [(file key, source, transposed)] into a safetensors file at path.

  The header (names, dtypes, shapes, byte ranges) is written first; each block of latent rows then
  goes to its own byte range with os.pwrite. A transposed [d, n] tensor receives a block of latent
  rows as a column band: d short writes per block, still no more than one block in memory.
  """
  np_dtype, st_dtype = DTYPES[dtype]
  size = np_dtype.itemsize
  header, offset, layout = {"__metadata__": {k: str(v) for k, v in metadata.items()}}, 0, []
  for key, source, transposed in tensors:
    shape = _shape(source, transposed, sae)
    nbytes = int(np.prod(shape)) * size
    header[key] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    layout.append((source, transposed, shape, offset))
    offset += nbytes
  head = json.dumps(header, separators=(",", ":")).encode()
  head += b" " * (-len(head) % 8)   # data starts 8-byte aligned
  base = 8 + len(head)
  # A killed export never leaves a torn file under `path`; a URL's file is written locally first.
  with paths.local_output(path) as tmp:
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
      os.pwrite(fd, struct.pack("<Q", len(head)) + head, 0)
      os.ftruncate(fd, base + offset)
      for source, transposed, shape, start in layout:
        for first, block in sae.blocks(source):
          block = np.asarray(block, np.float32).astype(np_dtype)
          if not transposed:   # rows [first, first + len) are one contiguous byte range
            os.pwrite(fd, block.tobytes(), base + start + first * int(np.prod(shape[1:])) * size)
            continue
          band = np.ascontiguousarray(block.T)     # [d, rows]: column band of the [d, n] tensor
          for i in range(shape[0]):
            os.pwrite(fd, band[i].tobytes(), base + start + (i * shape[1] + first) * size)
      os.fsync(fd)
    finally:
      os.close(fd)


def write_npz(path: str, sae: FoldedSae):
  """Gemma Scope's params.npz layout, streamed into an uncompressed zip entry by entry.

  W_enc [d, n] is stored with fortran_order=True: its bytes are then exactly the [n, d] row-major
  blocks the checkpoint yields, and np.load returns the [d, n] array as usual.
  """
  with paths.local_output(path) as tmp:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      for name in ("W_enc", "W_dec", "b_enc", "b_dec") + (
          ("threshold",) if sae.threshold is not None else ()) + (
          ("W_skip",) if sae.skip else ()):
        shape = _shape(name, name == "W_enc", sae)
        with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
          np.lib.format.write_array_header_1_0(
              f, {"descr": "<f4", "fortran_order": name == "W_enc", "shape": shape})
          for _, block in sae.blocks(name):
            f.write(np.asarray(block, "<f4").tobytes())


# ---- formats ------------------------------------------------------------------------------------

def _text(value) -> str:
  return value if isinstance(value, str) else json.dumps(value)


def export(workdir: str, fmt: str, out: str, dtype: str = "float32", step: int = -1,
           block_bytes: int = BLOCK_BYTES) -> dict:
  """Writes the SAE of a checkpoint step to `out`; returns the metadata it recorded."""
  if fmt not in FORMATS:
    raise ExportError(f"--format={fmt!r}: expected one of {FORMATS}")
  if dtype not in DTYPES:
    raise ExportError(f"--dtype={dtype!r}: expected one of {tuple(DTYPES)}")
  reader = StepReader(workdir, step)
  sae = FoldedSae(reader, block_bytes)
  meta = dict(reader.describe(), format=fmt, dtype=dtype)
  st_meta = {k: _text(v) for k, v in meta.items()}
  jumprelu = sae.threshold is not None
  if jumprelu and fmt == "sparsify":
    raise ExportError(f"{workdir} holds a BatchTopK SAE, a JumpReLU at inference; sparsify's "
                      "SparseCoder encodes k latents per row only: export --format=saelens or npz")
  if reader.transcoder and fmt == "saelens" and not jumprelu:
    raise ExportError(f"{workdir} holds a TopK transcoder; SAELens's transcoders encode with ReLU "
                      "or JumpReLU only (train sae.architecture=batchtopk for one it loads): "
                      "export --format=" + ("sparsify or npz" if reader.d_out == reader.d
                                            else "npz"))
  if reader.transcoder and fmt == "sparsify" and reader.d_out != reader.d:
    raise ExportError(f"{workdir} holds a transcoder from d={reader.d} to d_out={reader.d_out}; "
                      "sparsify's transcoders keep the input's width: export --format=npz")
  skip = [("W_skip", "W_skip", False)] if reader.skip else []
  if fmt == "npz":
    if dtype != "float32":
      raise ExportError("--format=npz holds float32 only (numpy has no bfloat16 .npy type)")
    write_npz(out, sae)
    _write_json(str(paths.of(out).with_suffix(".metadata.json")), meta)
    return meta
  paths.of(out).mkdir(parents=True, exist_ok=True)
  if fmt == "saelens":
    tensors = [("W_enc", "W_enc", True), ("b_enc", "b_enc", False), ("W_dec", "W_dec", False),
               ("b_dec", "b_dec", False)] + ([("threshold", "threshold", False)] if jumprelu else [])
    write_safetensors(paths.join(out, "sae_weights.safetensors"), sae, tensors + skip, dtype,
                      st_meta)
    if reader.transcoder:
      kind = {"architecture": "jumprelu_skip_transcoder" if reader.skip else "jumprelu_transcoder",
              "d_out": reader.d_out}
    else:
      kind = {"architecture": "jumprelu"} if jumprelu else {"architecture": "topk", "k": reader.k}
    _write_json(paths.join(out, "cfg.json"), {
        **kind, "d_in": reader.d, "d_sae": reader.n,
        "dtype": dtype, "device": "cpu", "apply_b_dec_to_input": not reader.transcoder,
        "normalize_activations": "none",
        "metadata": {"model_name": meta["model"], "hook_name": meta["hook"], **meta}})
  else:
    tensors = [("encoder.weight", "W_enc", False), ("encoder.bias", "b_enc", False),
               ("W_dec", "W_dec", False), ("b_dec", "b_dec", False)]
    write_safetensors(paths.join(out, "sae.safetensors"), sae, tensors + skip, dtype, st_meta)
    _write_json(paths.join(out, "cfg.json"), {
        "activation": "topk", "expansion_factor": max(1, reader.n // reader.d),
        # Decoder rows are unit norm in scaled units; folding divides them by the output's scale.
        "normalize_decoder": bool(sae.t == 1.0), "num_latents": reader.n,
        "k": reader.k,
        "multi_topk": bool(reader.config["sae"].get("multi_topk", False)),
        "skip_connection": reader.skip, "transcode": reader.transcoder, "d_in": reader.d})
  return meta


def _write_json(path: str, obj):
  paths.write_text(path, json.dumps(obj, indent=2))


# ---- command line -------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags():
  """Only when run as a command: imported (by checkpoint.py, tests), flags would clash with main's."""
  flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
  flags.DEFINE_integer("step", -1, "Checkpoint step to export; -1: the latest.")
  flags.DEFINE_enum("format", "saelens", FORMATS, "Output layout.")
  flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Stored dtype of the exported tensors.")
  flags.DEFINE_string("out", None, "Output folder (saelens, sparsify) or .npz file (npz).")
  flags.DEFINE_integer("block_mb", BLOCK_BYTES >> 20, "MiB of latent rows handled at a time; the "
                       "export holds a few such blocks and one checkpoint chunk (<= 64 MiB).")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    meta = export(FLAGS.workdir, FLAGS.format, FLAGS.out, FLAGS.dtype, FLAGS.step,
                  FLAGS.block_mb << 20)
  except (ExportError, CheckpointNotFound, OSError) as e:
    print(f"jaxsae.export: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"{FLAGS.out}: {FLAGS.format} SAE, d={meta['d']} n={meta['n']} k={meta['k']}, step "
        f"{meta['steps']} ({meta['tokens']:,} tokens), {FLAGS.dtype}, input scale "
        f"{meta['input_scale']:.6g} folded in")


if __name__ == "__main__":
  define_flags()
  app.run(main)
