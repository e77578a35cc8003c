"""The activation store: exact round trips, commits, and bad data named by file and rows."""
import json
import os

import ml_dtypes
import numpy as np
import pytest

from jaxsae.data.source import DataError
from jaxsae.data.store import Layout, Store, StoreWriter, numpy_dtype

D = 12
LAYOUT = Layout(chunk_rows=16, shard_rows=64)


def awkward_rows(n, dtype, seed=0):
  """Random rows plus the values a careless cast would change: extremes, subnormals, -0."""
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((n, D)) * 50).astype(np.float32).astype(numpy_dtype(dtype))
  info = ml_dtypes.finfo(x.dtype)
  x[0, :4] = [info.max, info.min, info.smallest_subnormal, -0.0]
  return x


def write(path, x, tokens=None, commit_every=37, finish=True, layout=LAYOUT):
  cols = {"tokens": "int32"} if tokens is not None else {}
  w = StoreWriter(path, D, str(x.dtype), cols, layout, {"test": True})
  for i in range(0, len(x), commit_every):   # appends that straddle chunks and shards
    extra = {"tokens": tokens[i:i + commit_every]} if tokens is not None else {}
    w.append(x[i:i + commit_every], **extra)
    if w.should_commit():
      w.commit({"next": i + commit_every})
  if finish:
    w.finish({"next": len(x)})
  return w


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
  x = awkward_rows(301, dtype)
  tokens = np.arange(301, dtype=np.int32) * 7
  write(str(tmp_path / "s"), x, tokens)
  s = Store(str(tmp_path / "s"))
  assert (s.rows, s.d, s.dtype, s.num_chunks) == (301, D, dtype, 19)
  got = s.read(0, 301)
  assert got.dtype == x.dtype and got.tobytes() == x.tobytes()
  assert np.array_equal(s.read(0, 301, "tokens"), tokens)
  assert got[:16].tobytes() == s.read(*s.chunk(0)).tobytes()
  stats = s.metadata["stats"]
  x64 = x.astype(np.float64)
  assert stats["rows"] == 301
  np.testing.assert_allclose(stats["mean"], x64.mean(0), rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(stats["norm_mean"], np.linalg.norm(x64, axis=1).mean(), rtol=1e-9)


def test_all_zero_chunks_are_stored(tmp_path):
  # TensorStore skips chunks equal to the fill value unless told not to; the store must not,
  # since a missing chunk reads as an error.
  x = np.zeros((100, D), np.float32)
  write(str(tmp_path / "s"), x, np.zeros(100, np.int32))
  s = Store(str(tmp_path / "s"))
  assert s.read(0, 100).tobytes() == x.tobytes() and not s.read(0, 100, "tokens").any()


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_compressed_round_trip(tmp_path, compression):
  x = awkward_rows(100, "bfloat16", seed=1)
  write(str(tmp_path / "s"), x, layout=Layout(16, 64, compression))
  assert Store(str(tmp_path / "s")).read(0, 100).tobytes() == x.tobytes()


def test_url_paths_go_through_tensorstore_drivers(tmp_path):
  # gs://bucket/dir takes the same route: the URL is handed to TensorStore as the kvstore.
  url = "file://" + str(tmp_path / "s")
  x = awkward_rows(70, "float32")
  write(url, x)
  assert Store(url).read(0, 70).tobytes() == x.tobytes()
  assert json.load(open(tmp_path / "s" / "metadata.json"))["rows"] == 70


def test_incomplete_store_is_refused_unless_asked(tmp_path):
  path = str(tmp_path / "s")
  x = awkward_rows(200, "float32")
  w = write(path, x, commit_every=40, finish=False)   # commits at 80 and 160 rows, never finishes
  assert w.rows == 160
  with pytest.raises(DataError, match="incomplete.*160 rows.*allow_incomplete"):
    Store(path)
  s = Store(path, allow_incomplete=True)
  assert s.rows == 160 and s.read(0, 160).tobytes() == x[:160].tobytes()
  with pytest.raises(DataError, match="out of range"):
    s.read(150, 170)


def test_writer_resumes_from_its_last_commit(tmp_path):
  path = str(tmp_path / "s")
  x = awkward_rows(200, "float16")
  w = write(path, x, commit_every=40, finish=False)
  w.append(x[160:180])   # appended but never committed: lost, as in a kill
  w2 = StoreWriter(path, D, "float16", {}, LAYOUT, {"test": True})
  assert (w2.rows, w2.state) == (160, {"next": 160})
  w2.append(x[160:])
  w2.finish({})
  ref = str(tmp_path / "ref")
  write(ref, x, commit_every=40)
  a, b = Store(path), Store(ref)
  assert a.read(0, 200).tobytes() == x.tobytes()
  assert a.metadata["stats"] == b.metadata["stats"]


def test_rerun_with_other_settings_is_refused(tmp_path):
  path = str(tmp_path / "s")
  write(path, awkward_rows(20, "float32"), finish=False)
  with pytest.raises(DataError, match="different dump.*info"):
    StoreWriter(path, D, "float32", {}, LAYOUT, {"test": False})
  with pytest.raises(DataError, match="dtype"):
    StoreWriter(path, D, "float16", {}, LAYOUT, {"test": True})


def test_missing_store_is_named(tmp_path):
  with pytest.raises(DataError, match=f"no activation store at {tmp_path}"):
    Store(str(tmp_path))


def _damaged_store(tmp_path, damage):
  path = str(tmp_path / "s")
  write(path, awkward_rows(200, "float32"))
  shard = os.path.join(path, "acts", "c", "1", "0")   # rows 64-127
  damage(shard)
  return Store(path), shard


def _flip_byte(shard):
  with open(shard, "r+b") as f:
    f.seek(100)
    b = f.read(1)
    f.seek(100)
    f.write(bytes([b[0] ^ 0x55]))


def _truncate(shard):
  os.truncate(shard, os.path.getsize(shard) // 2)


@pytest.mark.parametrize("damage", [_flip_byte, _truncate, os.remove],
                         ids=["corrupted", "truncated", "missing"])
def test_damaged_shard_names_file_and_rows(tmp_path, damage):
  s, shard = _damaged_store(tmp_path, damage)
  assert s.read(0, 64).shape == (64, D)          # other shards still read
  with pytest.raises(DataError) as e:
    s.read(64, 80)
  assert shard in str(e.value) and "rows 64-80" in str(e.value)


def test_rows_beyond_what_was_written_are_errors_not_zeros(tmp_path):
  path = str(tmp_path / "s")
  w = StoreWriter(path, D, "float32", {}, LAYOUT, {})
  w.append(awkward_rows(70, "float32"))
  w.finish({})
  meta_file = os.path.join(path, "metadata.json")
  meta = json.load(open(meta_file))
  meta["rows"] = 90
  json.dump(meta, open(meta_file, "w"))
  with pytest.raises(DataError, match="holds 70 rows; metadata says 90"):
    Store(path)
  # Even where the array's shape claims the rows, a chunk never written (rows 80-96, inside the
  # existing shard file) is an error rather than the fill value.
  zarr_json = os.path.join(path, "acts", "zarr.json")
  z = json.load(open(zarr_json))
  z["shape"][0] = 90
  json.dump(z, open(zarr_json, "w"))
  with pytest.raises(DataError, match=r"rows 80-90 .*acts/c/1/0"):
    Store(path).read(80, 90)
