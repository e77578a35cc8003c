"""Pallas kernels in two flavours: TPU-style (Mosaic TPU: sparse_ops, fused_adam, topk_encoder) and
GPU (Pallas Triton: the *_gpu siblings). `kernels=pallas` picks one with flavor(), at trace time.

FLAVOR = "auto": the GPU kernels on a GPU backend, the TPU ones elsewhere (TPU, and CPU in
interpret mode, as before the GPU versions existed). "tpu" or "gpu" force one; tests set "gpu" to
run the GPU kernels in CPU interpret mode.
"""
FLAVOR = "auto"
FLAVORS = ("auto", "tpu", "gpu")


def flavor() -> str:
  """'tpu' or 'gpu': which kernels `kernels=pallas` runs now."""
  if FLAVOR not in FLAVORS:
    raise ValueError(f"pallas_kernels.FLAVOR={FLAVOR!r}: expected one of {FLAVORS}")
  if FLAVOR != "auto":
    return FLAVOR
  import jax
  return "gpu" if jax.default_backend() == "gpu" else "tpu"
