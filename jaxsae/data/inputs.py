"""What the dump tool reads: .npy arrays in blocks, and text files cut into token windows.

Both stream: nothing is loaded whole, so inputs may be larger than memory, sit behind a pipe, or
live on gs:// (through etils.epath, when its cloud backend is installed). Both are deterministic
functions of their inputs, which is what lets an interrupted dump skip what it already stored.
"""
import glob
import json
import os
from typing import Callable, Iterator

import numpy as np

from jaxsae.data.source import DataError

try:   # etils opens gs:// and other remote paths; plain open() covers local files and pipes
  from etils import epath
except ImportError:  # pragma: no cover
  epath = None

PIECE_CHARS = 1 << 20   # text is tokenized in pieces of about this many characters


def _open(path: str, mode: str):
  if "://" in path and epath is not None:
    return epath.Path(path).open(mode)
  return open(path, mode)


class NpyReader:
  """A .npy file read front to back in blocks; opened once, so a pipe works too."""

  def __init__(self, path: str):
    self.path = path
    try:
      self._f = _open(path, "rb")
      version = np.lib.format.read_magic(self._f)
      read = np.lib.format.read_array_header_1_0 if version == (1, 0) \
          else np.lib.format.read_array_header_2_0
      self.shape, fortran, self.dtype = read(self._f)
    except (ValueError, OSError) as e:
      raise DataError(f"{path}: not a readable .npy file ({e})") from None
    if fortran or self.dtype.hasobject:
      raise DataError(f"{path}: Fortran-ordered or object arrays are not supported")

  def blocks(self, block_rows: int, start_block: int = 0, limit_rows: int = 0
             ) -> Iterator[np.ndarray]:
    """Rows [start_block * block_rows, limit_rows or all) in blocks of block_rows."""
    f, shape = self._f, self.shape
    rows = min(shape[0], limit_rows) if limit_rows else shape[0]
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
    skip = min(start_block * block_rows, rows) * row_bytes
    try:
      f.seek(skip, os.SEEK_CUR)
    except (OSError, ValueError):   # a pipe: read and drop
      while skip:
        got = f.read(min(skip, 1 << 24))
        if not got:
          break   # too short: the block loop below says so
        skip -= len(got)
    with f:
      for start in range(start_block * block_rows, rows, block_rows):
        want = (min(start + block_rows, rows) - start) * row_bytes
        data = bytearray()
        while len(data) < want:
          got = f.read(want - len(data))
          if not got:
            raise DataError(f"{self.path}: truncated at row {start + len(data) // row_bytes} "
                            f"(its header says {shape[0]} rows)")
          data += got
        yield np.frombuffer(data, self.dtype).reshape((-1,) + tuple(shape[1:]))


def massive_rows(acts: np.ndarray, ratio: float) -> np.ndarray:
  """Mask of rows whose norm exceeds ratio x the median norm of `acts` ("massive activations":
  first positions, separators). The dump drops them per forward batch; jaxsae.evaluate leaves the
  same rows of the same batches unspliced, so an SAE is scored on the rows it was trained on."""
  if not len(acts):
    return np.zeros(0, bool)
  norms = np.linalg.norm(np.asarray(acts, np.float32), axis=1)
  return norms > ratio * np.median(norms)


def expand_files(spec: str) -> list[str]:
  """Comma-separated files, globs or folders (all files inside, sorted) -> a sorted file list."""
  files = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    if os.path.isdir(part):
      files += sorted(os.path.join(r, f) for r, _, fs in os.walk(part) for f in fs)
    elif any(ch in part for ch in "*?["):
      files += sorted(glob.glob(part, recursive=True))
    else:
      files.append(part)
  if not files:
    raise DataError(f"--text={spec!r} names no files")
  return files


def documents(files: list[str]) -> Iterator[tuple[int, str]]:
  """(document id, piece of text): a .txt file is one document, a .jsonl line with a "text" field
  is one. Long documents come in pieces cut at line ends, so memory stays bounded."""
  doc = 0
  for path in files:
    try:
      f = _open(path, "r")
    except OSError as e:
      raise DataError(f"{path}: cannot open ({e})") from None
    with f:
      if path.endswith(".jsonl"):
        for n, line in enumerate(f):
          if line.strip():
            try:
              yield doc, json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
              raise DataError(f"{path}:{n + 1}: expected a JSON object with a \"text\" field") \
                  from None
            doc += 1
        continue
      piece = []
      size = 0
      for line in f:
        piece.append(line)
        size += len(line)
        if size >= PIECE_CHARS:
          yield doc, "".join(piece)
          piece, size = [], 0
      if piece:
        yield doc, "".join(piece)
      doc += 1


def token_windows(files: list[str], tokenize: Callable[[str], list], separator: int,
                  seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Fixed-length windows (token ids [seq_len], document ids [seq_len]) of the token stream
  doc0 SEP doc1 SEP ...; the last, incomplete window is dropped."""
  toks, docs, last = [], [], None
  for doc, text in documents(files):
    if last is not None and doc != last:
      toks.append(separator)
      docs.append(last)
    last = doc
    ids = tokenize(text)
    toks += ids
    docs += [doc] * len(ids)
    while len(toks) >= seq_len:
      yield np.array(toks[:seq_len], np.int32), np.array(docs[:seq_len], np.int32)
      del toks[:seq_len], docs[:seq_len]


def groups(items, size):
  """Lists of `size` consecutive items (the last may be shorter): windows per forward batch."""
  group = []
  for item in items:
    group.append(item)
    if len(group) == size:
      yield group
      group = []
  if group:
    yield group
