"""Two row-aligned stores read as one: a transcoder's input and target (data.target_path).

A transcoder learns y = f(x) from the same tokens seen at two hooks (e.g. an MLP's input and
output: `python -m jaxsae.dump --hooks=mlp_in,mlp_out`). PairedStore presents stores X [rows, d]
and Y [rows, d_out] as one store of rows [x, y] (d + d_out wide), so the loader's chunk order,
shuffle, eval split and resumable position apply to both at once and a row's x never meets
another row's y. The trainer splits the columns again (step.StepFns._inputs).

The two must have the same rows: equal row counts and chunking, and equal per-row columns (token
ids, documents, positions), checked on a sample of chunks spread over the store (all of them for
a store of up to FULL_CHECK_ROWS rows) before anything trains. Reads go through TensorStore (the
fast local reader is per store; a pair is read as two concurrent TensorStore reads per chunk).
"""
import numpy as np

from jaxsae.data.source import DataError
from jaxsae.data.store import Store, numpy_dtype

FULL_CHECK_ROWS = 1 << 22    # stores up to this many rows have every column row compared
SAMPLE_CHUNKS = 64           # larger ones: this many chunks, spread evenly, plus the last


class _Pair:
  """A future of both stores' rows, side by side."""

  def __init__(self, a, b, dtype):
    self._a, self._b, self._dtype = a, b, dtype

  def result(self) -> np.ndarray:
    return join(self._a.result(), self._b.result(), self._dtype)


def join(x: np.ndarray, y: np.ndarray, dtype) -> np.ndarray:
  return np.concatenate([x.astype(dtype, copy=False), y.astype(dtype, copy=False)], axis=1)


class PairedStore:
  """The Store interface the loader uses (rows, d, dtype, chunks, read, read_async), over x | y.

  d is the combined width; d_input and d_target the two parts. The dtype is the stores' own when
  they agree, else float32.
  """

  files = None   # no fast reader: every read is a pair of TensorStore reads

  def __init__(self, inputs: Store, targets: Store):
    self.inputs, self.targets = inputs, targets
    for what, a, b in (("rows", inputs.rows, targets.rows),
                       ("chunk_rows", inputs.chunk_rows, targets.chunk_rows)):
      if a != b:
        raise DataError(f"data.path={inputs.path} has {what}={a} but data.target_path="
                        f"{targets.path} has {what}={b}: a transcoder's input and target must be "
                        f"the same rows (two hooks of one dump: jaxsae.dump --hooks=mlp_in,mlp_out)")
    self.path = f"{inputs.path} -> {targets.path}"
    self.rows, self.chunk_rows, self.num_chunks = inputs.rows, inputs.chunk_rows, inputs.num_chunks
    self.d_input, self.d_target = inputs.d, targets.d
    self.d = inputs.d + targets.d
    self.dtype = inputs.dtype if inputs.dtype == targets.dtype else "float32"
    self._np_dtype = numpy_dtype(self.dtype)
    self.metadata = dict(inputs.metadata, target=dict(targets.metadata, path=targets.path))
    self.check_rows_match()

  def check_rows_match(self):
    """Refuses stores whose per-row columns (token ids, ...) differ, naming both and the row."""
    shared = sorted(set(self.inputs.columns) & set(self.targets.columns) - {"acts"})
    if not shared:
      raise DataError(f"data.path={self.inputs.path} and data.target_path={self.targets.path} "
                      f"share no per-row column (token ids) to check that their rows match; dump "
                      f"both with token ids (jaxsae.dump does unless --from-npy lacks --tokens-npy)")
    if self.rows <= FULL_CHECK_ROWS:   # one read of each whole column
      spans = [(0, self.rows)]
    else:
      chunks = sorted(set(np.linspace(0, self.num_chunks - 1, SAMPLE_CHUNKS).astype(int)))
      spans = [self.chunk(int(i)) for i in chunks]
    for start, stop in spans:
      for name in shared:
        a, b = self.inputs.read(start, stop, name), self.targets.read(start, stop, name)
        bad = np.flatnonzero(a != b)
        if bad.size:
          raise DataError(f"row {start + int(bad[0])}: column {name!r} is {a[bad[0]]} in "
                          f"data.path={self.inputs.path} but {b[bad[0]]} in data.target_path="
                          f"{self.targets.path} ({bad.size} of rows {start}-{stop} differ): the "
                          f"two stores do not hold the same tokens in the same order")

  def chunk(self, i: int) -> tuple[int, int]:
    return self.inputs.chunk(i)

  def read(self, start: int, stop: int, name: str = "acts") -> np.ndarray:
    if name != "acts":
      return self.inputs.read(start, stop, name)
    return join(self.inputs.read(start, stop), self.targets.read(start, stop), self._np_dtype)

  def read_async(self, start: int, stop: int) -> _Pair:
    return _Pair(self.inputs.read_async(start, stop), self.targets.read_async(start, stop),
                 self._np_dtype)
