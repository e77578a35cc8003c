"""The loader's fast chunk reader (shard_files.py) against TensorStore, and its errors."""
import json
import os

import numpy as np
import pytest

from jaxsae.data.loader import open_store
from jaxsae.data.shard_files import ShardFiles
from jaxsae.data.source import DataError
from jaxsae.data.store import Layout, Store, StoreWriter
from test_store import D, awkward_rows, write

LAYOUT = Layout(chunk_rows=16, shard_rows=64)


def chunk_bytes_ts(s: Store, i: int) -> bytes:
  return s.read(*s.chunk(i)).tobytes()


def chunk_bytes_direct(s: Store, i: int, block_rows: int = 5) -> bytes:
  """Blocks of 5 rows: chunks of 16 end in a partial block."""
  buf = np.empty(block_rows * s.files.row_bytes, np.uint8)
  return b"".join(rows.tobytes() for _, rows in s.read_chunk_blocks(i, buf))


@pytest.mark.parametrize("checksum", [True, False], ids=["crc32c", "no-checksum"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_every_chunk_reads_as_tensorstore_reads_it(tmp_path, dtype, checksum):
  path = str(tmp_path / "s")
  write(path, awkward_rows(301, dtype), layout=Layout(16, 64, checksum=checksum))  # partial tail
  s = Store(path)
  assert s.files is not None and s.files.checksum == checksum
  for i in range(s.num_chunks):
    assert chunk_bytes_direct(s, i) == chunk_bytes_ts(s, i), i
  assert Store("file://" + path).files is not None


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_compressed_and_remote_stores_go_through_tensorstore(tmp_path, compression):
  path = str(tmp_path / "s")
  write(path, awkward_rows(100, "float32"), layout=Layout(16, 64, compression=compression))
  assert Store(path).files is None
  assert Store(path, direct_read=False).files is None
  plain = str(tmp_path / "plain")
  write(plain, awkward_rows(100, "float32"))
  assert Store(plain).files is not None and Store(plain, direct_read=False).files is None


@pytest.mark.parametrize("group,batch,block_rows", [(3, 24, 16), (1, 16, 5), (5, 40, 1)])
def test_loader_batches_are_identical_with_and_without_the_fast_reader(tmp_path, monkeypatch,
                                                                       group, batch, block_rows):
  monkeypatch.setattr(ShardFiles, "BLOCK_BYTES", block_rows * D * 2)   # bfloat16 rows
  path = str(tmp_path / "s")
  write(path, awkward_rows(40 * 16 + 5, "bfloat16"))
  streams = []
  for direct in (True, False):
    data = open_store(path, global_batch=batch, eval_rows=40, eval_batches=0, seed=3, epochs=2,
                      group_chunks=group, num_threads=2, prefetch=2, allow_incomplete=False,
                      process_index=0, process_count=1, direct_read=direct)
    streams.append(np.concatenate(list(data.train)))
    data.close()
  assert streams[0].shape == (2 * 37 * 16 // batch * batch, D)
  assert streams[0].tobytes() == streams[1].tobytes()


def _store(tmp_path):
  path = str(tmp_path / "s")
  write(path, awkward_rows(200, "float32"))
  return path, os.path.join(path, "acts", "c", "1", "0")   # rows 64-127: chunks 4-7


def _flip(name, offset):
  with open(name, "r+b") as f:
    f.seek(offset)
    b = f.read(1)
    f.seek(offset)
    f.write(bytes([b[0] ^ 0x55]))


@pytest.mark.parametrize("damage,why", [
    (lambda f: _flip(f, 16 * D * 4 + 100), "chunk 5 fails its crc32c"),      # inside chunk 5
    (lambda f: _flip(f, os.path.getsize(f) - 30), "chunk index fails its checksum"),
    (lambda f: os.truncate(f, os.path.getsize(f) // 2), "chunk index fails its checksum"),
    (os.remove, "No such file"),
], ids=["chunk", "index", "truncated", "missing"])
def test_damaged_shard_names_file_and_rows(tmp_path, damage, why):
  path, shard = _store(tmp_path)
  damage(shard)
  s = Store(path)
  assert chunk_bytes_direct(s, 3) == chunk_bytes_ts(s, 3)   # other shards still read
  with pytest.raises(DataError, match=f"rows 80-96 cannot be read \\(shard file {shard}\\): .*{why}"):
    chunk_bytes_direct(s, 5)


def test_a_chunk_never_written_is_an_error_not_zeros(tmp_path):
  path = str(tmp_path / "s")
  w = StoreWriter(path, D, "float32", {}, LAYOUT, {})
  w.append(awkward_rows(70, "float32"))   # chunks 0-3 and 4 (partial); 5 is never written
  w.finish({})
  for name in ("metadata.json", os.path.join("acts", "zarr.json")):
    meta = json.load(open(os.path.join(path, name)))
    meta["rows" if "rows" in meta else "shape"] = 90 if "rows" in meta else [90, D]
    json.dump(meta, open(os.path.join(path, name), "w"))
  s = Store(path)
  assert chunk_bytes_direct(s, 4) == chunk_bytes_ts(s, 4)
  with pytest.raises(DataError, match=r"rows 80-90 .*acts/c/1/0\): chunk 5 was never written"):
    chunk_bytes_direct(s, 5)
