"""The activation store: zarr v3 arrays written and read through TensorStore.

Layout of a store (a folder on local disk, or a gs:// prefix; any TensorStore kvstore URL works):

  metadata.json   everything about the store; "complete": true only once the dump finished
  acts/           [rows, d] float32 | bfloat16 | float16, zarr3 with the sharding_indexed codec
  tokens/ ...     optional per-row int32 columns (token id, document id, position in window)

Each array is cut into chunks of `chunk_rows` rows (the unit the loader reads) packed into shard
files of `shard_rows` rows (the unit the filesystem sees: few large files). Chunk data and shard
indexes carry crc32c checksums, so a corrupted byte is an error, never a silent wrong number.

Writing appends rows and commits them now and then: a commit writes the buffered rows, then
metadata.json (rows, running statistics and the writer's resume state). A writer killed at any point
leaves a store whose metadata.json describes only rows that were fully written, so a rerun resumes
from the last commit. Rows past that point may exist on disk; they are overwritten, and readers
never look past metadata["rows"].
"""
import dataclasses
import json
import os
from typing import Optional

import numpy as np
import tensorstore as ts

from jaxsae.data.shard_files import ShardFiles
from jaxsae.data.source import DataError

FORMAT = "jaxsae-activation-store/1"
DTYPES = ("float32", "bfloat16", "float16")
COMPRESSIONS = ("none", "lz4", "zstd")
METADATA = "metadata.json"


@dataclasses.dataclass(frozen=True)
class Layout:
  chunk_rows: int = 4096     # rows per chunk: the loader's read unit
  shard_rows: int = 65536    # rows per shard file; a multiple of chunk_rows
  compression: str = "none"  # "none" | "lz4" | "zstd": floats compress poorly (4-9%), decode costs 2-3x
  checksum: bool = True      # crc32c per chunk: finds corrupted bytes; costs read speed (see bench)

  def check(self):
    if self.chunk_rows <= 0 or self.shard_rows % self.chunk_rows:
      raise DataError(f"shard_rows={self.shard_rows} must be a positive multiple of "
                      f"chunk_rows={self.chunk_rows}")
    if self.compression not in COMPRESSIONS:
      raise DataError(f"compression={self.compression!r}: expected one of {COMPRESSIONS}")


def numpy_dtype(name: str) -> np.dtype:
  if name not in DTYPES + ("int32",):
    raise DataError(f"dtype {name!r}: expected one of {DTYPES}")
  return ts.dtype(name).numpy_dtype   # bfloat16 is ml_dtypes.bfloat16, as in JAX


def kvstore(path: str):
  """A TensorStore kvstore for a local path or a URL (gs://bucket/dir/, memory://, file://...)."""
  if "://" in path:
    return path.rstrip("/") + "/"
  return {"driver": "file", "path": os.path.abspath(path) + "/"}


def _join(path: str, name: str) -> str:
  return path.rstrip("/") + "/" + name


def _codecs(compression: str, dtype: str, checksum: bool) -> list:
  codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
  if compression == "lz4":   # zarr3 has no bare lz4 codec; blosc carries it
    codecs.append({"name": "blosc", "configuration": {
        "cname": "lz4", "clevel": 5, "shuffle": "shuffle",
        "typesize": numpy_dtype(dtype).itemsize}})
  elif compression == "zstd":
    codecs.append({"name": "zstd", "configuration": {"level": 3}})
  return codecs + ([{"name": "crc32c"}] if checksum else [])


def _array_spec(path: str, name: str, dtype: str, width: Optional[int], layout: Layout,
                create: bool) -> dict:
  spec = {"driver": "zarr3", "kvstore": kvstore(_join(path, name)),
          # A missing chunk or shard is an error, not a block of zeros; so every chunk is
          # written, even one that equals the fill value (all-zero ids, say).
          "fill_missing_data_reads": False, "store_data_equal_to_fill_value": True}
  if not create:
    return dict(spec, open=True)
  tail = [width] if width else []
  spec["metadata"] = {
      "shape": [0] + tail, "data_type": dtype,
      "chunk_grid": {"name": "regular",
                     "configuration": {"chunk_shape": [layout.shard_rows] + tail}},
      "codecs": [{"name": "sharding_indexed", "configuration": {
          "chunk_shape": [layout.chunk_rows] + tail,
          "codecs": _codecs(layout.compression, dtype, layout.checksum),
          "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                           {"name": "crc32c"}]}}]}
  return dict(spec, create=True, delete_existing=True)


def read_metadata(path: str) -> Optional[dict]:
  """metadata.json of the store at path, or None if there is none."""
  try:
    kv = ts.KvStore.open(kvstore(path)).result()
    got = kv.read(METADATA).result()
  except ValueError as e:
    raise DataError(f"{_join(path, METADATA)}: cannot read ({e})") from None
  if got.state == "missing":
    return None
  try:
    return json.loads(got.value)
  except ValueError as e:
    raise DataError(f"{_join(path, METADATA)}: not valid JSON ({e})") from None


def write_metadata(path: str, meta: dict) -> None:
  # The file kvstore writes to a temporary file and renames it: a kill never leaves half a file.
  kv = ts.KvStore.open(kvstore(path)).result()
  kv.write(METADATA, json.dumps(meta, indent=1).encode()).result()


class RowStats:
  """Running mean vector and norm statistics, in float64, restorable from metadata.json."""

  def __init__(self, d: int, state: Optional[dict] = None):
    s = state or {}
    self.count = int(s.get("count", 0))
    self.sum = np.array(s.get("sum", np.zeros(d)), np.float64)
    self.sq_sum = float(s.get("sq_sum", 0.0))       # sum of squared norms
    self.norm_sum = float(s.get("norm_sum", 0.0))
    self.norm_min = float(s.get("norm_min") or np.inf)   # None (JSON) before any row
    self.norm_max = float(s.get("norm_max", 0.0))

  def add(self, x: np.ndarray) -> None:
    if not len(x):
      return
    x = x.astype(np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    norms = np.sqrt(sq)
    self.count += len(x)
    self.sum += x.sum(0)
    self.sq_sum += float(sq.sum())
    self.norm_sum += float(norms.sum())
    self.norm_min = min(self.norm_min, float(norms.min()))
    self.norm_max = max(self.norm_max, float(norms.max()))

  def state(self) -> dict:
    return {"count": self.count, "sum": self.sum.tolist(), "sq_sum": self.sq_sum,
            "norm_sum": self.norm_sum, "norm_min": self.norm_min if self.count else None,
            "norm_max": self.norm_max}

  def summary(self) -> dict:
    """What users read: the mean vector, mean norm, mean squared norm, centred variance."""
    n = max(self.count, 1)
    mean = self.sum / n
    mean_sq = self.sq_sum / n
    return {"rows": self.count, "mean": mean.tolist(),
            "mean_vector_norm": float(np.linalg.norm(mean)),
            "norm_mean": self.norm_sum / n,
            "norm_std": float(np.sqrt(max(mean_sq - (self.norm_sum / n) ** 2, 0.0))),
            "norm_min": self.norm_min if self.count else 0.0, "norm_max": self.norm_max,
            "mean_sq_norm": mean_sq,
            # E|x - mean|^2: the variance the normalized MSE (FVU) divides by.
            "centered_mean_sq_norm": float(mean_sq - mean @ mean)}


class StoreWriter:
  """Appends rows to a store, commits now and then, and resumes an interrupted dump.

  `info` (model, layer, settings, ...) is recorded in metadata.json; a rerun with different info
  is refused rather than mixing two dumps in one store.
  """

  def __init__(self, path: str, d: int, dtype: str, columns: dict, layout: Layout, info: dict):
    layout.check()
    numpy_dtype(dtype)
    self.path, self.d, self.dtype, self.layout = path, d, dtype, layout
    self.columns = {"acts": dtype, **columns}
    meta = read_metadata(path)
    want = json.loads(json.dumps({"format": FORMAT, "d": d, "dtype": dtype, "columns": columns,
                                  "layout": dataclasses.asdict(layout), "info": info}))
    if meta is None:
      self.meta = dict(want, complete=False, rows=0, state={}, stats={})
      self._arrays = {name: ts.open(_array_spec(path, name, dt, d if name == "acts" else None,
                                                layout, create=True)).result()
                      for name, dt in self.columns.items()}
      write_metadata(path, self.meta)
    else:
      differ = sorted(k for k in want if meta.get(k) != want[k])
      if differ:
        raise DataError(f"{path} holds a different dump ({', '.join(differ)} differ; "
                        f"stored: {json.dumps({k: meta.get(k) for k in differ})[:500]}); "
                        "use a new --out or delete it")
      self.meta = meta
      self._arrays = {name: ts.open(_array_spec(path, name, dt, None, layout, create=False)
                                    ).result() for name, dt in self.columns.items()}
    self.rows = int(self.meta["rows"])             # committed rows
    self.stats = RowStats(d, self.meta.get("stats_state"))
    # Rows of the last, incomplete shard are kept in memory and rewritten whole with the next
    # commit, so each shard file is written at most twice instead of read-modified-written often.
    self._base = self.rows - self.rows % layout.shard_rows
    self._buffer = {name: [self._read_back(name)] for name in self.columns}
    self._pending = 0

  @property
  def complete(self) -> bool:
    return bool(self.meta.get("complete"))

  @property
  def state(self) -> dict:
    """The caller's resume state as of the last commit (e.g. how much input was consumed)."""
    return self.meta.get("state", {})

  def _read_back(self, name):
    arr = self._arrays[name]
    if self.rows == self._base:
      return np.zeros((0,) + tuple(arr.shape[1:]), arr.dtype.numpy_dtype)
    return read_rows(arr, self.path, name, self._base, self.rows)

  def append(self, acts: np.ndarray, **columns: np.ndarray) -> None:
    if acts.ndim != 2 or acts.shape[1] != self.d:
      raise DataError(f"rows of shape {acts.shape} do not fit a store of d={self.d}")
    if set(columns) != set(self.columns) - {"acts"}:
      raise DataError(f"columns {sorted(columns)} given; the store has {sorted(self.columns)}")
    acts = np.asarray(acts).astype(numpy_dtype(self.dtype), copy=False)
    self.stats.add(acts)   # statistics of the rows as stored
    self._buffer["acts"].append(acts)
    for name, values in columns.items():
      self._buffer[name].append(np.asarray(values, np.int32).reshape(-1))
    self._pending += len(acts)

  def should_commit(self) -> bool:
    """True once a whole shard's worth of rows waits in memory."""
    return self._pending >= self.layout.shard_rows

  def commit(self, state: dict, **fields) -> None:
    """Writes buffered rows, then metadata.json with the caller's resume state and fields."""
    end = self.rows + self._pending
    for name in self.columns:
      rows = np.concatenate(self._buffer[name]) if len(self._buffer[name]) > 1 \
          else self._buffer[name][0]
      arr = self._arrays[name]
      if arr.shape[0] != end:   # metadata-only: no data is moved
        arr = self._arrays[name] = arr.resize(
            exclusive_max=[end] + list(arr.shape[1:]), resize_metadata_only=True).result()
      if len(rows):
        arr[self._base:end].write(rows).result()
      keep = end - end % self.layout.shard_rows
      self._buffer[name] = [rows[keep - self._base:]]
    self.rows, self._base, self._pending = end, end - end % self.layout.shard_rows, 0
    self.meta.update(fields, rows=end, state=state, stats_state=self.stats.state(),
                     stats=self.stats.summary())
    write_metadata(self.path, self.meta)

  def finish(self, state: dict, **fields) -> None:
    """Commits the rest and marks the store complete; only now may readers use it by default."""
    self.commit(state, complete=True, **fields)


def read_rows(arr, path: str, name: str, start: int, stop: int) -> np.ndarray:
  """arr[start:stop] as numpy; failures name the shard file and the row range."""
  try:
    return arr[start:stop].read().result()
  except Exception as e:  # TensorStore raises ValueError for missing, truncated, corrupt data
    raise DataError(f"{path}: rows {start}-{stop} of {name!r} cannot be read "
                    f"(shard file {shard_file(arr, path, name, start)}): {e}") from None


def shard_file(arr, path: str, name: str, row: int) -> str:
  shard_rows = arr.chunk_layout.write_chunk.shape[0]
  tail = "/0" if arr.rank == 2 else ""
  return _join(path, f"{name}/c/{row // shard_rows}{tail}")


class Store:
  """A store opened for reading; only its first metadata["rows"] rows are ever read.

  `files` is the fast chunk reader for a local uncompressed store (shard_files.py), else None;
  direct_read=False always reads through TensorStore.
  """

  def __init__(self, path: str, allow_incomplete: bool = False, direct_read: bool = True):
    meta = read_metadata(path)
    if meta is None:
      raise DataError(f"no activation store at {path} ({METADATA} not found)")
    if meta.get("format") != FORMAT:
      raise DataError(f"{_join(path, METADATA)}: format {meta.get('format')!r}, expected {FORMAT}")
    if not meta.get("complete") and not allow_incomplete:
      raise DataError(f"{path} is incomplete ({meta['rows']} rows committed; its dump did not "
                      "finish): rerun the dump to complete it, or set data.allow_incomplete=True")
    self.path, self.metadata = path, meta
    self.rows, self.d, self.dtype = int(meta["rows"]), int(meta["d"]), meta["dtype"]
    self.chunk_rows = int(meta["layout"]["chunk_rows"])
    self.num_chunks = -(-self.rows // self.chunk_rows)
    self.columns = ["acts"] + sorted(meta["columns"])
    self._arrays = {}
    for name in self.columns:
      try:
        arr = ts.open(_array_spec(path, name, "", None, Layout(), create=False)).result()
      except ValueError as e:
        raise DataError(f"{_join(path, name)}: cannot open array ({e})") from None
      if arr.shape[0] < self.rows:
        raise DataError(f"{_join(path, name)} holds {arr.shape[0]} rows; metadata says {self.rows}")
      self._arrays[name] = arr
    acts = self._arrays["acts"]
    if acts.shape[1] != self.d or str(acts.dtype.numpy_dtype) != self.dtype:
      raise DataError(f"{_join(path, 'acts')} is {acts.dtype.name} [*, {acts.shape[1]}]; "
                      f"metadata says {self.dtype} [*, {self.d}]")
    self.files = ShardFiles.for_array(path, "acts", acts) if direct_read else None

  def chunk(self, i: int) -> tuple[int, int]:
    """Row range [start, stop) of chunk i."""
    return i * self.chunk_rows, min((i + 1) * self.chunk_rows, self.rows)

  def read(self, start: int, stop: int, name: str = "acts") -> np.ndarray:
    if not 0 <= start <= stop <= self.rows:
      raise DataError(f"{self.path}: rows {start}-{stop} out of range (store has {self.rows})")
    return read_rows(self._arrays[name], self.path, name, start, stop)

  def read_chunk_blocks(self, i: int, buf: np.ndarray):
    """Chunk i's acts rows in blocks, by the fast reader (only for a store whose `files` is set):
    see ShardFiles.read_blocks, whose checksum is checked when the generator finishes."""
    start, stop = self.chunk(i)
    for first, rows in self.files.read_blocks(i, buf, f"{start}-{stop}"):
      if first < stop - start:
        yield first, rows[:stop - start - first]

  def read_async(self, start: int, stop: int):
    """A future of acts[start:stop], so that several chunks are read at once."""
    return self._arrays["acts"][start:stop].read()
