"""Streams an activation store into training: a grain pipeline over chunk-aligned blocks.

Reading single rows from disk is ~300x slower than reading whole chunks, so shuffling happens in two
stages. Each epoch, the training chunks are put in a seeded order (grain's index shuffle) and dealt
to the JAX processes round-robin; each process reads its chunks `group` at a time (the shuffle
buffer), on grain threads, and mixes the rows of a group in memory before cutting batches.

Each process's rows form one stream: epoch 0's chunks, then epoch 1's, ... Groups never straddle an
epoch, so the first (chunks per epoch x chunk_rows) rows of the stream hold each of this process's
chunks exactly once. Batches may straddle groups and epochs. Everything is a pure function of
(seed, process, group index), so the iterator state is just a position: {group, piece, step}.

Held-out eval chunks are chosen once, spread evenly over the store (a store is usually ordered by
text source), plus the last chunk when it is partial: training then only ever sees full chunks.
"""
import ctypes
import ctypes.util
import math
import sys
import threading

import grain
import numpy as np

from jaxsae.data.paired import PairedStore
from jaxsae.data.source import BatchIterator, Data, DataError
from jaxsae.data.store import Store, numpy_dtype


def split_chunks(store: Store, eval_rows: int) -> tuple[np.ndarray, np.ndarray]:
  """(train chunk ids, eval chunk ids): eval is a partial last chunk plus evenly spaced chunks."""
  C = store.chunk_rows
  full = store.rows // C
  partial = [full] if store.rows % C else []
  need = max(0, eval_rows - (store.rows % C))
  take = min(full, math.ceil(need / C)) if eval_rows else 0
  if eval_rows and take >= full:
    raise DataError(f"data.eval_rows={eval_rows} leaves no training chunks in {store.path} "
                    f"({store.rows} rows in chunks of {C})")
  picked = (np.arange(take) * full + full // 2) // max(take, 1)   # evenly spaced, deterministic
  is_eval = np.zeros(full, bool)
  is_eval[picked] = True
  evals = np.concatenate([np.flatnonzero(is_eval), partial]).astype(np.int64) if eval_rows \
      else np.zeros(0, np.int64)
  return np.flatnonzero(~is_eval).astype(np.int64), evals


class Plan:
  """Which chunks make group g of one process, and where the group sits in its row stream."""

  def __init__(self, train_chunks: np.ndarray, chunk_rows: int, group_chunks: int,
               local_batch: int, seed: int, epochs: int, process_index: int, process_count: int):
    n, P = len(train_chunks), process_count
    if n < P:
      raise DataError(f"{n} training chunks cannot be dealt to {P} processes: use smaller "
                      "chunks (dump --chunk_rows) or fewer eval rows")
    self.chunks, self.C, self.K, self.L = train_chunks, chunk_rows, group_chunks, local_batch
    self.seed, self.epochs, self.p, self.P = seed, epochs, process_index, P
    self.per_epoch = len(range(process_index, n, P))        # this process's chunks per epoch
    self.groups_per_epoch = math.ceil(self.per_epoch / group_chunks)
    self.order = grain.MapDataset.range(n).shuffle(seed=seed)  # reshuffled per epoch by index
    # Every process stops after the same number of batches (SPMD steps run in lockstep); the
    # process with the fewest chunks per epoch sets it.
    least = (n // P) * chunk_rows * epochs
    self.num_batches = least // local_batch if epochs else None
    if self.num_batches == 0:
      raise DataError(f"{epochs} epoch(s) of {least // max(epochs, 1)} rows per process cannot "
                      f"fill one batch of {local_batch} rows")

  def group(self, g: int) -> np.ndarray:
    epoch, k = divmod(g, self.groups_per_epoch)
    n = len(self.chunks)
    local = range(k * self.K, min((k + 1) * self.K, self.per_epoch))
    return self.chunks[[self.order[epoch * n + self.p + self.P * j] % n for j in local]]

  def start_row(self, g: int) -> int:
    epoch, k = divmod(g, self.groups_per_epoch)
    return self.C * (epoch * self.per_epoch + k * self.K)


class GroupReader:
  """grain map: group index -> (index, pieces). Pieces end where batches end in the row stream.

  A local uncompressed store is read by store.files: pread in ~512 KiB blocks into this thread's
  buffer, crc32c checked, 2-3x faster than through TensorStore warm. It has no read-ahead of its
  own: asking the kernel for the next groups' chunks (posix_fadvise WILLNEED) made cold reads
  slower, not faster, on the CI VM; more threads (data.num_threads = data.prefetch = 4) help there.
  Any other store is read through TensorStore, whose reads of the next `read_ahead` groups are
  issued when group g is taken (TensorStore does that I/O on its own threads).
  """

  def __init__(self, store: Store, plan: Plan, read_ahead: int = 0):
    self.store, self.plan, self.read_ahead = store, plan, read_ahead
    self._started = {}   # group -> (chunk ids, futures); at most read_ahead + a few entries
    self._lock = threading.Lock()
    self._buffers = threading.local()
    self._dtype = numpy_dtype(store.dtype)
    self._row = np.dtype((np.void, store.d * self._dtype.itemsize))   # one row as opaque bytes

  def _start(self, g: int):
    ids = self.plan.group(g)
    if self.store.files:
      return ids, None
    return ids, [self.store.read_async(*self.store.chunk(int(i))) for i in ids]

  def _take(self, g: int):
    """Group g's reads (started now if no earlier call started them), and start the next ones."""
    plan = self.plan
    last = plan.groups_per_epoch * plan.epochs if plan.epochs else None
    with self._lock:
      started = self._started.pop(g, None)
      for old in [h for h in self._started if h < g - 8 or h > g + self.read_ahead + 8]:
        del self._started[old]   # stale: the iterator was restored elsewhere
      for h in range(g + 1, g + 1 + self.read_ahead):
        if h not in self._started and (last is None or h < last):
          self._started[h] = self._start(h)
    return started or self._start(g)

  def _blocks(self, ids, futures):
    """(k, first row, rows) for blocks of each chunk k of the group, rows as opaque byte strings
    (np.void): moved with one memcpy per row whatever the dtype (numpy's generic path for
    ml_dtypes' bfloat16 is slower). A block is valid until the next one is taken."""
    if futures is None:
      buf = getattr(self._buffers, "buf", None)
      if buf is None:
        rows = self.store.files.block_rows()
        buf = self._buffers.buf = np.empty(rows * self.store.files.row_bytes, np.uint8)
      for k in np.argsort(ids, kind="stable"):   # in file order: fewer seeks off a cold disk
        for first, rows in self.store.read_chunk_blocks(int(ids[k]), buf):
          yield k, first, rows
      return
    # All reads of a group are in flight at once: on gs:// (or a cold disk) latency, not
    # bandwidth, is what limits one reader.
    for k, (i, f) in enumerate(zip(ids, futures)):
      try:
        chunk = f.result()
      except Exception:   # read it again alone, to raise the DataError naming file and rows
        chunk = self.store.read(*self.store.chunk(int(i)))
      yield k, 0, chunk.view(self._row).reshape(-1)

  def __call__(self, g: int, _=None):
    plan, C, d = self.plan, self.plan.C, self.store.d
    ids, futures = self._take(g)
    n = C * len(ids)   # training chunks are always full
    perm = np.random.default_rng([plan.seed, plan.p, g]).permutation(n)
    first = (-plan.start_row(g)) % plan.L
    cuts = [0] + list(range(first or plan.L, n, plan.L)) + [n]
    # A piece is a random set of the group's rows, kept in group order: row j of the group goes
    # to position dest[j]. Each block is scattered into place as soon as it is read (a sequential
    # read and random row writes, ~2x faster here than gathering from all chunks held at once).
    # Nothing leaves before every chunk's checksum has been checked.
    dest = np.empty(n, np.intp)
    for a, b in zip(cuts[:-1], cuts[1:]):
      dest[np.sort(perm[a:b])] = np.arange(a, b)
    out = np.empty(n, self._row)
    for k, first, rows in self._blocks(ids, futures):
      out[dest[k * C + first:k * C + first + len(rows)]] = rows
    return g, [out[a:b].view(self._dtype).reshape(b - a, d) for a, b in zip(cuts[:-1], cuts[1:])]


class StoreBatches(BatchIterator):
  """Local batches [local_batch, d] from the grain pipeline; state = {group, piece, step}."""

  def __init__(self, store: Store, plan: Plan, num_threads: int, prefetch: int):
    epochs = plan.epochs or None
    groups = grain.MapDataset.range(plan.groups_per_epoch).repeat(epochs)
    reader = GroupReader(store, plan, read_ahead=0 if store.files else prefetch)
    self._dataset = groups.map_with_index(reader)
    # Threads, not processes: TensorStore and numpy release the GIL, and on 2 cores threads
    # measured 4-6x faster than worker processes. The buffer is set explicitly: the default
    # held ~6 GB.
    self._options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    self._plan = plan
    self.set_state({"group": 0, "piece": 0, "step": 0})

  def __next__(self) -> np.ndarray:
    plan = self._plan
    if plan.num_batches is not None and self._step >= plan.num_batches:
      raise StopIteration
    parts, have = [], 0
    while have < plan.L:
      if self._piece == len(self._pieces):
        self._group, self._pieces = next(self._it)
        self._piece = 0
      parts.append(self._pieces[self._piece])
      have += len(parts[-1])
      self._pieces[self._piece] = None   # free it as soon as it is consumed
      self._piece += 1
    self._step += 1
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

  def get_state(self) -> dict:
    if self._piece == len(self._pieces):   # the next batch starts with the next group
      return {"group": self._group + 1, "piece": 0, "step": self._step}
    return {"group": self._group, "piece": self._piece, "step": self._step}

  def set_state(self, state: dict) -> None:
    g, self._step = int(state["group"]), int(state["step"])
    self._it = iter(self._dataset[g:].to_iter_dataset(self._options))
    self._group, self._pieces, self._piece = g - 1, [], 0
    if int(state["piece"]):
      self._group, self._pieces = next(self._it)
      self._piece = int(state["piece"])

  def close(self):
    close = getattr(self._it, "close", None)
    if close:
      close()


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def retain_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1,
                        arena_max: int = 4) -> bool:
  """Lets glibc reuse freed chunk and batch buffers instead of returning them to the kernel.

  By default glibc serves blocks over 32 MiB (and, with several threads, many smaller ones) with
  fresh mmap()s and unmaps them on free, so every chunk read and every batch touches new pages
  that the kernel must fault in and zero. On the 2-core VM that kernel time was 1.7 s of 2.1 s
  for one warm pass over 0.8 GB (sys time; 0.07 s with this), and the loader ran 1.5-1.7x faster.
  The cost: the process keeps its peak heap instead of shrinking (bounded by ~(prefetch +
  threads) groups). Process-wide and idempotent; a no-op (False) off glibc.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):   # musl and others have no mallopt
    return False
  return all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, mmap_threshold),
                                              (_M_TRIM_THRESHOLD, trim_threshold),
                                              (_M_ARENA_MAX, arena_max)))


def open_store(path: str, global_batch: int, eval_rows: int, eval_batches: int, seed: int,
               epochs: int, group_chunks: int, num_threads: int, prefetch: int,
               allow_incomplete: bool, process_index: int, process_count: int,
               dtype: str = "", missing_hint: str = "", direct_read: bool = True,
               target_path: str = "") -> Data:
  """The `Data` of an activation store for one process (see source.Data); with target_path, of
  the pair (data/paired.py): batches hold each row's input and target side by side."""
  try:
    store = Store(path, allow_incomplete=allow_incomplete, direct_read=direct_read)
  except DataError as e:
    raise DataError(f"data.path: {e}" + (f"\n  {missing_hint}" if missing_hint else "")) from None
  if dtype and dtype != store.dtype:
    raise DataError(f"data.dtype={dtype!r} but the store at {path} holds {store.dtype}: "
                    f"set data.dtype={store.dtype!r} (or \"\" to accept any)")
  d_input, d_target = store.d, 0
  if target_path:
    try:
      target = Store(target_path, allow_incomplete=allow_incomplete, direct_read=False)
    except DataError as e:
      raise DataError(f"data.target_path: {e}") from None
    store = PairedStore(store, target)
    d_target = target.d
  if global_batch % process_count:
    raise DataError(f"train.batch_size={global_batch} is not divisible by {process_count} processes")
  local = global_batch // process_count
  train_ids, eval_ids = split_chunks(store, eval_rows)
  plan = Plan(train_ids, store.chunk_rows, group_chunks, local, seed, epochs, process_index,
              process_count)
  train = StoreBatches(store, plan, num_threads, prefetch)

  eval_total = sum(b - a for a, b in map(store.chunk, eval_ids))

  def eval_iter():
    per = min(global_batch, eval_total) // process_count * process_count
    part = per // process_count
    todo = min(eval_batches, eval_total // per) if per else 0
    rows, ids = np.zeros((0, store.d), numpy_dtype(store.dtype)), list(eval_ids)
    for _ in range(todo):
      while len(rows) < per:
        rows = np.concatenate([rows, store.read(*store.chunk(int(ids.pop(0))))])
      yield rows[process_index * part:(process_index + 1) * part]
      rows = rows[per:]

  def init_sample(count: int) -> np.ndarray:
    """The same rows on every process: drawn from a few random training chunks."""
    rng = np.random.default_rng([seed, 12345])
    want = min(len(train_ids), 4 * math.ceil(count / store.chunk_rows))
    picks = np.sort(rng.choice(train_ids, size=want, replace=False))
    rows = np.concatenate([store.read(*store.chunk(int(i))) for i in picks])
    take = rng.choice(len(rows), size=min(count, len(rows)), replace=False)
    return rows[np.sort(take)].astype(np.float32)

  meta = dict(store.metadata, source="store", path=path)
  for bulky in ("stats_state", "state"):
    meta.pop(bulky, None)
  return Data(d=d_input, d_target=d_target, dtype=store.dtype, train=train,
              eval_batches=eval_iter if eval_total else None, init_sample=init_sample,
              metadata=meta, close=train.close, eval_rows=eval_total,
              train_rows=sum(b - a for a, b in map(store.chunk, train_ids)))
