"""The PyTorch peers that the benchmarks train and time beside jaxsae, loaded by name.

  saelens   bench/saelens_peer.py   SAELens's TopKTrainingSAE + SAETrainer (`pip install sae-lens`)
  sparsify  bench/sparsify_peer.py  EleutherAI sparsify's SparseCoder + Trainer (`eai-sparsify`)
  dictlearn bench/dictlearn_peer.py dictionary_learning's AutoEncoderTopK + TopKTrainer
                                    (`dictionary-learning`, installed --no-deps: BUILD.md)

Every peer module has `versions() -> dict`, `LABEL` (its name in tables) and a `Peer` class with
`step(batch)` (a numpy array or a torch tensor already on the peer's device), `to_device(array)`,
`sync()`, `make_dead(frac)` (the first frac of latents dead and kept dead, for timing AuxK),
`finish()`, `dead_frac()`, `reconstruct(x)`, `decoder_directions()`, `sae_weights()` (the
trained SAE in raw units as a jaxsae.sae_io.SaeWeights, for jaxsae.evaluate) and `recipe`.
A transcoder peer (sparsify's, bench/quality.py on a pair of stores) steps on rows [x | y], its
input and target side by side, and `reconstruct(x)` takes input rows and returns the target's
estimate.

Scripts reach this module as `bench.peers` with the repository root on sys.path and bench/ off it
(each script's `__main__` block does that; see bench/__init__.py for why).
"""
import importlib
import os

import numpy as np

MODULES = {"saelens": "bench.saelens_peer", "sparsify": "bench.sparsify_peer",
           "dictlearn": "bench.dictlearn_peer"}
INSTALL = {"saelens": "pip install 'sae-lens>=6,<7'",
           "sparsify": "pip install eai-sparsify==1.3.3",
           "dictlearn": "pip install --no-deps dictionary-learning==0.1.0 einops"}


def saved_and_read(save, label: str):
  """The SAE that `save(folder)` writes in its library's own format, read back by jaxsae.sae_io
  (the reader a user's saved SAE goes through), labelled `label`."""
  import dataclasses
  import tempfile
  from jaxsae import sae_io
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, "sae")
    save(folder)
    return dataclasses.replace(sae_io.load(folder), path=label)


def numpy_reconstruct(sae, x: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """(x_hat, l0 per row) of raw rows through a jaxsae.sae_io.SaeWeights's numpy encode: how the
  JumpReLUs (BatchTopK SAEs at inference) are scored."""
  outs, l0s = [], []
  for i in range(0, len(x), batch):
    z = sae.encode_dense(x[i:i + batch])
    outs.append(z @ sae.w_dec + sae.b_dec)
    l0s.append((z > 0).sum(-1))
  return np.concatenate(outs), np.concatenate(l0s)


def at_equal_l0(sae, x: np.ndarray, k: int, batch: int = 4096) -> tuple[float, np.ndarray]:
  """(threshold, x_hat) of a JumpReLU SAE (jaxsae.sae_io.SaeWeights with a threshold) scored at
  L0 = k: its threshold replaced by the one value that keeps exactly the rows * k largest
  positive pre-activations of these rows (ties aside), so that SAEs whose own thresholds give
  different L0s are compared at the same sparsity. The threshold is fitted on the rows it scores
  (every trainer's the same way). Each row's top 8k values are its candidates; where some row has
  more than that above the threshold (BatchTopK trains k per row only on average: seen with
  Matryoshka on SynthSAEBench-16k), the threshold is taken over every pre-activation instead."""
  width = min(8 * k, sae.n)
  pres, tops = [], []
  for i in range(0, len(x), batch):
    pre = (np.asarray(x[i:i + batch], np.float32) - sae.b_dec) @ sae.w_enc + sae.b_enc
    pres.append(pre)
    tops.append(-np.sort(-np.partition(pre, -width, axis=1)[:, -width:], axis=1))
  top = np.concatenate(tops)
  values = np.sort(top[top > 0].ravel())[::-1]
  threshold = float(values[min(len(x) * k, len(values)) - 1])
  if width < sae.n and np.any(top[:, -1] >= threshold):   # candidates missed some: exact, [rows, n]
    every = np.concatenate(pres).ravel()
    every = every[every > 0]
    rank = len(every) - min(len(x) * k, len(every))   # ascending position of the (rows * k)th largest
    threshold = float(np.partition(every, rank)[rank])
  x_hat = np.concatenate([np.where(p >= threshold, p, 0.0) @ sae.w_dec + sae.b_dec for p in pres])
  return threshold, x_hat


def load(name: str):
  """The peer module for `name`; ImportError (with the install hint) when its library is missing."""
  if name not in MODULES:
    raise ValueError(f"unknown peer {name!r}: expected one of {sorted(MODULES)}")
  try:
    module = importlib.import_module(MODULES[name])
    module.versions()   # imports the library itself
  except ImportError as e:
    extra = "" if name == "dictlearn" else " or pip install -e '.[bench]'"
    raise ImportError(f"peer {name!r} unavailable ({e}); install torch first (BUILD.md), then "
                      f"{INSTALL[name]}{extra}") from e
  return module


class TorchPeer:
  """What a peer shares with the others (bench/dictlearn_peer.py uses it): batches to its
  `device`, CUDA synchronization, and `reconstruct` in batches through its `encode_decode(x)`,
  which returns (x_hat, l0 per row) as tensors."""
  device = "cpu"

  def to_device(self, batch: np.ndarray):
    import torch
    # np.array copies: torch wants a writable array, and arrays from jax are read-only.
    return torch.from_numpy(np.array(batch, dtype=np.float32)).to(self.device)

  def as_tensor(self, batch):
    """A numpy batch on the device; a tensor (already there, from `to_device`) as it is."""
    import torch
    return batch if isinstance(batch, torch.Tensor) else self.to_device(batch)

  def sync(self):
    if str(self.device).startswith("cuda"):
      import torch
      torch.cuda.synchronize()

  def reconstruct(self, x: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(x_hat, l0 per row) of raw rows (after `finish`), `batch` rows at a time."""
    import torch
    outs, l0s = [], []
    with torch.no_grad():
      for i in range(0, len(x), batch):
        x_hat, l0 = self.encode_decode(self.to_device(x[i:i + batch]))
        outs.append(x_hat.float().cpu().numpy())
        l0s.append(l0.cpu().numpy())
    return np.concatenate(outs), np.concatenate(l0s)
