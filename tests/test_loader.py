"""The grain loader: every row once per epoch on 1, 2 and 4 processes; exact resume; eval split."""
import json
import os

import numpy as np
import pytest

from configs import base
from jaxsae import data as data_lib
from jaxsae.data.loader import open_store
from jaxsae.data.source import DataError
from jaxsae.data.store import Layout, StoreWriter

C = 16                 # chunk rows
ROWS = 40 * C + 5      # 40 full chunks and a partial one
EVAL_ROWS = 40         # the partial chunk (5 rows) plus 3 full chunks
TRAIN_CHUNKS = 37
D = 4


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """Row i holds i in column 0, so every delivered row says where it came from."""
  path = str(tmp_path_factory.mktemp("loader") / "store")
  x = np.zeros((ROWS, D), np.float32)
  x[:, 0] = np.arange(ROWS)
  x[:, 1:] = np.random.default_rng(0).standard_normal((ROWS, D - 1))
  w = StoreWriter(path, D, "float32", {}, Layout(C, 4 * C), {})
  w.append(x)
  w.finish({})
  return path


def open_(path, process_index=0, process_count=1, batch=24, epochs=0, group=3, seed=7, **kw):
  args = dict(global_batch=batch, eval_rows=EVAL_ROWS, eval_batches=4, seed=seed, epochs=epochs,
              group_chunks=group, num_threads=2, prefetch=2, allow_incomplete=False,
              process_index=process_index, process_count=process_count)
  return open_store(path, **dict(args, **kw))


def ids(batch):
  return batch[:, 0].astype(np.int64)


def take(data, n):
  return [next(data.train) for _ in range(n)]


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_every_row_once_per_epoch(store, processes):
  batch = 24
  local = batch // processes
  eval_ids = set()
  per_epoch = {}   # epoch -> rows delivered by all processes
  for p in range(processes):
    data = open_(store, p, processes, batch)
    chunks = len(range(p, TRAIN_CHUNKS, processes))      # round-robin deal of each epoch
    stream = np.concatenate([ids(b) for b in take(data, -(-3 * chunks * C // local))])
    for epoch in range(3):
      rows = stream[epoch * chunks * C:(epoch + 1) * chunks * C]
      per_epoch.setdefault(epoch, []).append(rows)
    for b in data.eval_batches():
      assert len(b) == local
      eval_ids.update(ids(b))
    data.close()
  train_ids = None
  for epoch, parts in per_epoch.items():
    rows = np.concatenate(parts)
    assert len(rows) == len(set(rows)) == TRAIN_CHUNKS * C, f"epoch {epoch}"
    train_ids = set(rows) if train_ids is None else train_ids
    assert set(rows) == train_ids        # the same rows, every epoch
  held_out = set(range(ROWS)) - train_ids   # whole chunks, the partial last one among them
  assert len(held_out) == 3 * C + 5 and ROWS - 1 in held_out
  assert eval_ids <= held_out and len(eval_ids) == 2 * batch   # 2 full batches fit in 53 rows


def test_batches_mix_chunks_and_epochs_reshuffle(store):
  data = open_(store, batch=24, group=4)
  epoch0 = np.concatenate([ids(b) for b in take(data, TRAIN_CHUNKS * C // 24)])
  epoch1 = np.concatenate([ids(b) for b in take(data, TRAIN_CHUNKS * C // 24)])
  assert all(len(set(ids(b) // C)) > 1 for b in take(open_(store, batch=24, group=4), 10))
  assert not np.array_equal(epoch0[:100], epoch1[:100])
  # A different seed, a different order; the same seed, the same order.
  assert not np.array_equal(epoch0[:48], ids(np.concatenate(take(open_(store, seed=8), 2))))
  assert np.array_equal(epoch0[:48], ids(np.concatenate(take(open_(store, group=4), 2))))


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_finite_epochs_stop_together(store, processes):
  counts = []
  for p in range(processes):
    data = open_(store, p, processes, epochs=2)
    got = [ids(b) for b in data.train]
    counts.append(len(got))
    every = np.concatenate(got)
    assert max(np.unique(every, return_counts=True)[1]) <= 2
  # Lockstep: every process stops after as many batches as the least-served one can fill.
  assert counts == [2 * (TRAIN_CHUNKS // processes) * C // (24 // processes)] * processes


@pytest.mark.parametrize("skip", [0, 1, 5, 9, 30])
def test_restored_iterator_continues_exactly(store, skip):
  a = open_(store, 1, 2, batch=40, group=2)   # 20-row local batches cut 32-row groups unevenly
  take(a, skip)
  state = json.loads(json.dumps(a.train.get_state()))   # what a checkpoint stores
  expected = take(a, 12)
  b = open_(store, 1, 2, batch=40, group=2)
  b.train.set_state(state)
  got = take(b, 12)
  assert all(x.tobytes() == y.tobytes() for x, y in zip(expected, got))
  a.close()
  b.close()


def test_init_sample_is_the_same_everywhere(store):
  a = open_(store, 0, 2).init_sample(50)
  b = open_(store, 1, 2).init_sample(50)
  assert a.dtype == np.float32 and a.shape == (50, D)
  assert np.array_equal(a, b)
  eval_rows = set(ids(np.concatenate(list(open_(store).eval_batches()))))
  assert not set(ids(a)) & eval_rows


def config_for(path, **data):
  c = base.get_config()
  c.sae.d = D
  c.train.batch_size = 24
  c.data.source = "store"
  c.data.path = path
  c.data.eval_rows = EVAL_ROWS
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def test_create_checks_dtype_and_d_before_training(store):
  data = data_lib.create(config_for(store, dtype="float32"))
  assert (data.d, data.dtype, data.metadata["rows"]) == (D, "float32", ROWS)
  assert next(data.train).shape == (24, D)
  with pytest.raises(DataError, match="data.dtype='bfloat16'.*float32"):
    data_lib.create(config_for(store, dtype="bfloat16"))
  c = config_for(store)
  c.sae.d = 8
  with pytest.raises(DataError, match="sae.d=8.*d=4"):
    data_lib.create(c)


def test_incomplete_and_missing_stores(tmp_path):
  path = str(tmp_path / "s")
  w = StoreWriter(path, D, "float32", {}, Layout(C, 4 * C), {})
  w.append(np.ones((10 * C, D), np.float32))
  w.commit({})
  with pytest.raises(DataError, match="incomplete"):
    data_lib.create(config_for(path, eval_rows=0))
  data = data_lib.create(config_for(path, eval_rows=0, allow_incomplete=True))
  assert next(data.train).shape == (24, D)
  with pytest.raises(DataError, match="no activation store.*\n  run: make it"):
    data_lib.create(config_for(str(tmp_path / "nothing"), missing_hint="run: make it"))


def test_corrupt_chunk_stops_the_loader_with_file_and_rows(tmp_path):
  path = str(tmp_path / "s")
  w = StoreWriter(path, D, "float32", {}, Layout(C, 4 * C), {})
  w.append(np.ones((12 * C, D), np.float32))
  w.finish({})
  shard = os.path.join(path, "acts", "c", "2", "0")   # rows 128-191
  with open(shard, "r+b") as f:
    f.write(b"\xff" * 8)
  data = data_lib.create(config_for(path, eval_rows=0))
  with pytest.raises(DataError, match=r"rows 1\d\d-1\d\d .*acts/c/2/0"):
    for _ in range(100):
      next(data.train)


_REFAULT = """
import resource, sys
import numpy as np
from jaxsae.data import loader
if sys.argv[1] == "retain":
  assert loader.retain_freed_memory()
def touch():
  a = np.empty(64 << 20, np.uint8)
  a[:] = 1
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="glibc mallopt")
def test_retain_freed_memory_stops_refaulting_batch_buffers():
  """A freed 64 MiB buffer is reused without page faults (the control, without it, refaults)."""
  import subprocess
  import sys
  faults = {mode: int(subprocess.run([sys.executable, "-c", _REFAULT, mode], check=True,
                                     capture_output=True, text=True).stdout)
            for mode in ("default", "retain")}
  assert faults["default"] >= 16, faults     # fresh pages: at least one fault per 4 MiB
  assert faults["retain"] <= 2, faults
