"""Reads a store's uncompressed chunks straight from its local shard files (the loader's fast path).

TensorStore reads a chunk at ~10% of the speed of a plain read() of the same bytes (bench/loader.py:
its copies, cache and per-chunk bookkeeping), and the loader is meant to keep up with the disk. For
the common case (a local store, codec chain `bytes` [+ `crc32c`], no compression) a chunk is one
contiguous byte range of a shard file, so this reads it with pread() into a small reused buffer and
sums its crc32c (the crc32c package, hardware accelerated) as it goes. Anything else (gs://,
lz4/zstd) goes through TensorStore: `ShardFiles.for_array` says which.

The zarr v3 sharding_indexed layout it relies on (https://zarr-specs.readthedocs.io, codec
"sharding_indexed", index_location "end", the layout TensorStore writes): a shard file ends with an
index of (offset, nbytes) little-endian uint64 pairs, one per inner chunk in C order, followed by
the index's own crc32c; a chunk never written has offset = nbytes = 2^64 - 1. With the crc32c codec
a chunk's bytes are its raw little-endian rows followed by their crc32c. tests/test_shard_files.py
checks every read against TensorStore's, in all dtypes, with and without checksums.
"""
import os
import sys
import threading

import numpy as np

from jaxsae.data.source import DataError

_MISSING = np.uint64(2**64 - 1)


def _crc32c():
  """crc32c.crc32c, or None. ICRAR's package: SSE4.2/ARMv8 instructions, and it releases the GIL
  on large buffers, so the loader's threads check chunks in parallel (google-crc32c holds it)."""
  try:
    import crc32c
  except ImportError:
    return None
  return crc32c.crc32c


def local_path(path: str):
  """The filesystem path of a local store (a plain path or a file:// URL), else None."""
  if path.startswith("file://"):
    return path[len("file://"):]
  return None if "://" in path else path


class ShardFiles:
  """Chunk reader for one [rows, d] zarr3 array of a local store, without TensorStore."""

  @classmethod
  def for_array(cls, path: str, name: str, arr) -> "ShardFiles | None":
    """The reader for TensorStore array `arr` (store `path`, array folder `name`), or None where
    its layout is not the one read here (remote store, compression, other codecs)."""
    local, crc = local_path(path), _crc32c()
    codecs = arr.codec.to_json().get("codecs", [])
    if local is None or sys.byteorder != "little" or len(codecs) != 1 or arr.rank != 2:
      return None
    shard = codecs[0].get("configuration", {})
    chain = shard.get("codecs", []) + shard.get("index_codecs", [])
    names = lambda codecs: [c.get("name") for c in codecs]  # noqa: E731
    if (codecs[0].get("name") != "sharding_indexed" or shard.get("index_location", "end") != "end"
        or names(shard.get("codecs", [])) not in (["bytes"], ["bytes", "crc32c"])
        or names(shard.get("index_codecs", [])) != ["bytes", "crc32c"] or crc is None
        or any(c.get("configuration", {}).get("endian") != "little" for c in chain
               if c.get("name") == "bytes")):
      return None
    inner = names(shard["codecs"])
    chunk_rows, d = shard["chunk_shape"]
    return cls(os.path.join(local, name), d * arr.dtype.numpy_dtype.itemsize, chunk_rows,
               arr.chunk_layout.write_chunk.shape[0], checksum=inner[-1] == "crc32c")

  def __init__(self, array_dir: str, row_bytes: int, chunk_rows: int, shard_rows: int,
               checksum: bool):
    self.dir, self.row_bytes = array_dir, row_bytes
    self.chunk_rows, self.per_shard, self.checksum = chunk_rows, shard_rows // chunk_rows, checksum
    self.chunk_bytes = chunk_rows * row_bytes + (4 if checksum else 0)
    self._crc = _crc32c()
    self._index = {}   # shard number -> [per_shard, 2] (offset, nbytes)
    self._lock = threading.Lock()

  def _error(self, rows: str, name: str, reason: str) -> DataError:
    # Worded like store.read_rows's errors, which the TensorStore path raises.
    return DataError(f"{self.dir}: rows {rows} cannot be read (shard file {name}): {reason}")

  def file(self, shard: int) -> str:
    return os.path.join(self.dir, "c", str(shard), "0")

  def _shard_index(self, shard: int, rows: str) -> np.ndarray:
    with self._lock:
      index = self._index.get(shard)
    if index is not None:
      return index
    name, size = self.file(shard), 16 * self.per_shard + 4
    try:
      with open(name, "rb") as f:
        f.seek(0, os.SEEK_END)
        file_size = f.tell()
        f.seek(max(file_size - size, 0))
        raw = f.read(size)
    except OSError as e:
      raise self._error(rows, name, e.strerror) from None
    if len(raw) < size or self._crc(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
      raise self._error(rows, name, "truncated or corrupted: its chunk index fails its checksum")
    index = np.frombuffer(raw[:-4], "<u8").reshape(self.per_shard, 2)
    bad = (index[:, 0] != _MISSING) & ((index[:, 1] != self.chunk_bytes)
                                       | (index[:, 0] + index[:, 1] > file_size - size))
    if bad.any():
      raise self._error(rows, name, "its chunk index does not match the store's layout "
                        f"({self.chunk_bytes}-byte chunks inside the file)")
    with self._lock:
      self._index[shard] = index
    return index

  def _locate(self, chunk: int, rows: str) -> tuple[str, int]:
    shard, inner = divmod(chunk, self.per_shard)
    offset, _ = self._shard_index(shard, rows)[inner]
    if offset == _MISSING:
      raise self._error(rows, self.file(shard), f"chunk {chunk} was never written")
    return self.file(shard), int(offset)

  # ~512 KiB: a block stays in the core's L2 cache while its checksum is summed and its rows are
  # moved (~15% faster than whole chunks, measured on the CPU VM).
  BLOCK_BYTES = 1 << 19

  def block_rows(self) -> int:
    """Rows per block of read_blocks."""
    return max(1, min(self.chunk_rows, self.BLOCK_BYTES // self.row_bytes))

  def read_blocks(self, chunk: int, buf: np.ndarray, rows: str):
    """Yields (first row, rows) for consecutive blocks of chunk `chunk`, each [<= block_rows]
    opaque (np.void) rows read into buf (uint8, block_rows() rows long) and valid until the next
    block. With checksums, the chunk's crc32c is checked after its last block: a caller must not
    let any row out before the generator finishes. `rows` ("start-stop") is what errors name."""
    name, offset = self._locate(chunk, rows)
    per, row = len(buf) // self.row_bytes, np.dtype((np.void, self.row_bytes))
    crc = 0
    try:
      fd = os.open(name, os.O_RDONLY)
    except OSError as e:
      raise self._error(rows, name, e.strerror) from None
    try:
      for first in range(0, self.chunk_rows, per):
        view = buf[:min(per, self.chunk_rows - first) * self.row_bytes]
        if os.preadv(fd, [view], offset + first * self.row_bytes) != len(view):
          raise self._error(rows, name, f"truncated inside chunk {chunk}")
        if self.checksum:
          crc = self._crc(view, crc)
        yield first, view.view(row)
      if self.checksum:
        stored = bytearray(4)
        if os.preadv(fd, [stored], offset + self.chunk_rows * self.row_bytes) != 4:
          raise self._error(rows, name, f"truncated inside chunk {chunk}")
        if crc != int.from_bytes(stored, "little"):
          raise self._error(rows, name, f"corrupted: chunk {chunk} fails its crc32c checksum")
    except OSError as e:
      raise self._error(rows, name, e.strerror) from None
    finally:
      os.close(fd)
