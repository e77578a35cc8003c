"""A store of the same activations in another basis: rows times a random orthogonal matrix.

  python bench/rotate_acts.py --out=/tmp/jaxsae/datasets/fixture-rot            # every coordinate
  python bench/rotate_acts.py --out=/tmp/jaxsae/datasets/fixture-halfrot --fraction=0.5
  python bench/rotate_acts.py --from_store=/tmp/jaxsae/datasets/smollm2-L3 --rows=409600 \
      --out=/tmp/jaxsae/datasets/l3-rot                  # --fraction=0: the same rows, unrotated

A rotation changes nothing an SAE could learn (features, codes and reconstructions all rotate
with it) but the coordinates, which Adam treats one by one: the controlled test of the automatic
rate's density factor (jaxsae/optim.py, bench/history.md nineteenth session). --fraction rotates
only that share of the coordinates (chosen at random) among themselves, for a density between the
data's own and a dense basis's. The rows go through a float32 .npy beside --out (deleted after)
and `python -m jaxsae.dump --from-npy`; the element densities before and after are printed.
"""
import os
import subprocess
import sys

import numpy as np
from absl import app, flags

from jaxsae.stats import element_density

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FROM = flags.DEFINE_string(
    "from_npy", os.path.join(ROOT, "..", "shared", "data", "smollm2-135m-L15.acts.f16.npy"),
    "activations [rows, d] (default: the shared fixture)")
_FROM_STORE = flags.DEFINE_string("from_store", "", "an activation store instead (an incomplete "
                                  "one too: its committed rows)")
_ROWS = flags.DEFINE_integer("rows", 0, "the first this many rows (0: all)")
_OUT = flags.DEFINE_string("out", None, "the new store", required=True)
_FRACTION = flags.DEFINE_float("fraction", 1.0, "share of the coordinates rotated, in [0, 1] "
                               "(0: the rows as they are, a control with the same rows)")
_SEED = flags.DEFINE_integer("seed", 12345, "seed of the rotation and of the coordinates chosen")
_BLOCK = 65536


def rotation(d: int, fraction: float, seed: int):
  """(coordinates rotated, a Haar-random orthogonal matrix on them)."""
  rng = np.random.default_rng(seed)
  coords = np.sort(rng.permutation(d)[:int(round(fraction * d))])
  if len(coords) < 2:
    return coords[:0], None
  q, r = np.linalg.qr(rng.standard_normal((len(coords), len(coords))))
  return coords, q * np.sign(np.diag(r))   # the sign fix makes q Haar-distributed


def main(_):
  if not 0 <= _FRACTION.value <= 1:
    raise app.UsageError(f"--fraction={_FRACTION.value}: expected a value in [0, 1]")
  if _FROM_STORE.value:
    from jaxsae.data.store import Store
    store = Store(_FROM_STORE.value, allow_incomplete=True)
    shape, read = (store.rows, store.d), store.read
  else:
    x = np.load(_FROM.value, mmap_mode="r")
    if x.ndim != 2:
      raise app.UsageError(f"{_FROM.value}: expected [rows, d], got shape {x.shape}")
    shape, read = x.shape, lambda a, b: x[a:b]
  shape = (min(shape[0], _ROWS.value or shape[0]), shape[1])
  coords, q = rotation(shape[1], _FRACTION.value, _SEED.value)
  tmp = _OUT.value.rstrip("/") + ".rotated.f32.npy"
  out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
  try:
    for i in range(0, shape[0], _BLOCK):
      rows = np.array(read(i, min(i + _BLOCK, shape[0])), np.float32)   # a copy, even of float32
      if q is not None:
        rows[:, coords] = rows[:, coords] @ q
      out[i:i + _BLOCK] = rows
    out.flush()
    n = min(shape[0], 32768)
    print(f"element density (stats.element_density, {n} rows): "
          f"{element_density(read(0, n)):.3f} -> {element_density(out[:n]):.3f}", flush=True)
    del out
    subprocess.run([sys.executable, "-m", "jaxsae.dump", f"--from-npy={tmp}", f"--out={_OUT.value}",
                    "--chunk_rows=1024", "--shard_rows=16384"], check=True)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


if __name__ == "__main__":
  app.run(main)
