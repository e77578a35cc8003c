"""What the trainer needs from any activation source, and the .npy source used until the store lands.

A source hands each JAX process its own slice of every global batch as a host numpy array
[batch_size // process_count, d]; the trainer assembles the global array on the mesh. Iterators
expose get_state()/set_state() (JSON-serializable dicts) so a checkpoint resumes the exact data order.
"""
import dataclasses
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np


class DataError(ValueError):
  """Bad input data: names the file and what is wrong with it."""


class BatchIterator(Iterator[np.ndarray]):
  """A resumable iterator of process-local batches."""

  def get_state(self) -> dict:
    raise NotImplementedError

  def set_state(self, state: dict) -> None:
    raise NotImplementedError


@dataclasses.dataclass
class Data:
  d: int                                   # width of each activation row (a transcoder's input)
  dtype: str                               # numpy dtype name of the stored rows
  train: BatchIterator                     # endless (or epoch-limited) local training batches
  eval_batches: Optional[Callable[[], Iterable[np.ndarray]]]  # fresh pass over held-out local batches
  init_sample: Callable[[int], np.ndarray]  # same rows on every process, for input scale and b_pre
  d_target: int = 0                        # a transcoder's target width: rows are then d + d_target
                                           # wide, the input then the target (data/paired.py)
  metadata: dict = dataclasses.field(default_factory=dict)   # model, hook, ... (exports record it)
  train_rows: int = 0                      # rows the training stream draws from (0: endless)
  eval_rows: int = 0                       # held-out rows
  ground_truth: Optional[np.ndarray] = None  # [features, d] unit true features (synthetic data only)
  close: Callable[[], Any] = lambda: None


class NpyBatches(BatchIterator):
  """Epochs over rows[:limit] of a (memory-mapped) array in a seeded per-epoch permutation.

  Process p takes every process_count-th row of each global batch, so processes never overlap.
  """

  def __init__(self, rows: np.ndarray, global_batch: int, seed: int, process_index: int,
               process_count: int):
    self._rows, self._gb, self._seed = rows, global_batch, seed
    self._p, self._pc = process_index, process_count
    self._per_epoch = len(rows) // global_batch
    if self._per_epoch == 0:
      raise DataError(f"{len(rows)} training rows cannot fill one batch of {global_batch}")
    self._step = 0
    self._perm_epoch, self._perm = -1, None

  def __next__(self) -> np.ndarray:
    epoch, i = divmod(self._step, self._per_epoch)
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._rows))
      self._perm_epoch = epoch
    take = np.sort(self._perm[i * self._gb:(i + 1) * self._gb][self._p::self._pc])
    self._step += 1
    return np.asarray(self._rows[take])

  def get_state(self) -> dict:
    return {"step": self._step}

  def set_state(self, state: dict) -> None:
    self._step = int(state["step"])


def open_npy(path: str, global_batch: int, eval_rows: int, eval_batches: int, seed: int,
             process_index: int, process_count: int) -> Data:
  """Activations [rows, d] in a .npy file; the last eval_rows rows are held out."""
  try:
    rows = np.load(path, mmap_mode="r")
  except FileNotFoundError:
    raise DataError(f"data.path: no such file: {path}") from None
  except ValueError as e:
    raise DataError(f"data.path: {path} is not a readable .npy array ({e})") from None
  if rows.ndim != 2:
    raise DataError(f"data.path: {path} holds shape {rows.shape}; expected [rows, d]")
  if eval_rows >= len(rows):
    raise DataError(f"data.eval_rows={eval_rows} leaves no training rows in {path} ({len(rows)} rows)")
  split = len(rows) - eval_rows
  train = NpyBatches(rows[:split], global_batch, seed, process_index, process_count)
  local = global_batch // process_count

  def eval_iter():
    held = rows[split:]
    per_batch = min(global_batch, len(held))
    for b in range(min(eval_batches, len(held) // per_batch)):
      yield np.asarray(held[b * per_batch:(b + 1) * per_batch][process_index::process_count][:local])

  def init_sample(count):
    pick = np.random.default_rng(seed + 1).choice(split, size=min(count, split), replace=False)
    return np.asarray(rows[np.sort(pick)], dtype=np.float32)

  return Data(d=rows.shape[1], dtype=str(rows.dtype), train=train,
              eval_batches=eval_iter if eval_rows else None, init_sample=init_sample,
              metadata={"source": "npy", "path": path}, train_rows=split,
              eval_rows=len(rows) - split)
