"""The PyTorch peers that the benchmarks train and time beside jaxsae, loaded by name.

  saelens   bench/saelens_peer.py   SAELens's TopKTrainingSAE + SAETrainer (`pip install sae-lens`)
  sparsify  bench/sparsify_peer.py  EleutherAI sparsify's SparseCoder + Trainer (`eai-sparsify`)

Every peer module has `versions() -> dict`, `LABEL` (its name in tables) and a `Peer` class with
`step(batch)` (a numpy array or a torch tensor already on the peer's device), `to_device(array)`,
`sync()`, `make_dead(frac)` (the first frac of latents dead and kept dead, for timing AuxK),
`finish()`, `dead_frac()`, `reconstruct(x)`, `decoder_directions()` and `recipe`.

Scripts reach this module as `bench.peers` with the repository root on sys.path and bench/ off it
(each script's `__main__` block does that; see bench/__init__.py for why).
"""
import importlib

MODULES = {"saelens": "bench.saelens_peer", "sparsify": "bench.sparsify_peer"}
INSTALL = {"saelens": "pip install 'sae-lens>=6,<7'",
           "sparsify": "pip install eai-sparsify==1.3.3"}


def load(name: str):
  """The peer module for `name`; ImportError (with the install hint) when its library is missing."""
  if name not in MODULES:
    raise ValueError(f"unknown peer {name!r}: expected one of {sorted(MODULES)}")
  try:
    module = importlib.import_module(MODULES[name])
    module.versions()   # imports the library itself
  except ImportError as e:
    raise ImportError(f"peer {name!r} unavailable ({e}); install torch first (BUILD.md), then "
                      f"{INSTALL[name]} or pip install -e '.[bench]'") from e
  return module
