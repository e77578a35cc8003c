"""A store of SynthSAEBench-16k-like synthetic activations, with its ground-truth features.

  python bench/make_synthsae.py --out=/tmp/jaxsae/datasets/synthsae16k

SAELens (>= 6.5x, the `sae_lens.synthetic` package) ships the generator of SynthSAEBench
(Chanin & Garriga-Alonso 2026): 16,384 unit features in 768 dimensions, orthogonalized as far as
they go, Zipfian firing (0.4 .. 5e-4, exponent 0.5), 128 trees of depth 3 and branching 4 with
mutually exclusive children (a child fires only with its parent, scaled by it), a rank-25
correlation between features, magnitudes 5 -> 4 with folded-normal spread, and a bias of norm 0.5.
The values below are those of its published SynthSAEBench-16k model (seed 42); the benchmark's own
weights are on the Hugging Face hub, which this machine cannot reach, so the model is rebuilt from
its configuration. The data is nothing jaxsae was tuned on: superposition (16k features, 768
dimensions, SAEs of 4k latents), hierarchy and correlations, none of which the built-in synthetic
source has.

Writes OUT (a jaxsae store, through `python -m jaxsae.dump --from_npy`, float32, no row filter)
and OUT.ground_truth.npy ([16384, 768] float32, unit rows): bench/quality.py scores every SAE
trained on OUT against it (gt_mcc: SAELens's mean correlation coefficient, a one-to-one Hungarian
matching; gt_mmcs: each feature's best decoder row). Building the model orthogonalizes 16k x 768
vectors (~30 min on 2 CPU cores, once: the model is saved as OUT.model and reused); drawing
835k rows takes ~10 min more.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "store to write; OUT.ground_truth.npy beside it")
_ROWS = flags.DEFINE_integer("rows", 819_200 + 16_384,
                             "rows: 200 steps of 4096 plus the 16,384 held out")
_SEED = flags.DEFINE_integer("seed", 42, "the model's seed (SynthSAEBench-16k's: 42)")
_SAMPLE_SEED = flags.DEFINE_integer("sample_seed", 0, "torch seed for drawing the rows")
_BLOCK = flags.DEFINE_integer("block_rows", 8192, "rows drawn at once")
_FEATURES = flags.DEFINE_integer("num_features", 16_384, "ground-truth features (smaller only to "
                                 "try the script: the trees shrink with them)")
_HIDDEN = flags.DEFINE_integer("hidden_dim", 768, "the activations' width")


def model_config(seed: int, num_features: int = 16_384, hidden_dim: int = 768):
  from sae_lens.synthetic.firing_magnitudes import (FoldedNormalMagnitudeConfig,
                                                    LinearMagnitudeConfig)
  from sae_lens.synthetic.synthetic_model import (
      HierarchyConfig, LowRankCorrelationConfig, OrthogonalizationConfig, SyntheticModelConfig,
      ZipfianFiringProbabilityConfig)
  return SyntheticModelConfig(
      num_features=num_features, hidden_dim=hidden_dim,
      firing_probability=ZipfianFiringProbabilityConfig(max_prob=0.4, min_prob=5e-4,
                                                        exponent=0.5),
      hierarchy=HierarchyConfig(total_root_nodes=num_features // 128, branching_factor=4, max_depth=3,
                                mutually_exclusive_portion=1.0, mutually_exclusive_min_depth=0,
                                compensate_probabilities=True, scale_children_by_parent=True),
      mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
      std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
      correlation=LowRankCorrelationConfig(correlation_scale=0.1, rank=25),
      orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
      bias=0.5, seed=seed)


def main(_):
  import numpy as np
  import torch
  from sae_lens.synthetic.synthetic_model import SyntheticModel

  out = _OUT.value.rstrip("/")
  truth_path = out + ".ground_truth.npy"
  if os.path.exists(os.path.join(out, "metadata.json")) and os.path.exists(truth_path):
    print(f"{out} and {truth_path} exist; nothing to do")
    return
  t0 = time.time()
  cfg = model_config(_SEED.value, _FEATURES.value, _HIDDEN.value)
  saved = out + ".model"   # built once: a rerun (more rows, another sample seed) reuses it
  if os.path.isdir(saved):
    model = SyntheticModel.load_from_disk(saved)
  else:
    model = SyntheticModel(cfg)
    model.save(saved + ".tmp")
    os.replace(saved + ".tmp", saved)
  model.use_sparse_tensors = False   # its sparse-COO hierarchy path is ~10x slower on CPU here
  print(f"model built in {time.time() - t0:.0f} s", flush=True)
  truth = model.feature_dict.feature_vectors.detach().numpy().astype(np.float32)
  truth /= np.linalg.norm(truth, axis=1, keepdims=True)

  torch.manual_seed(_SAMPLE_SEED.value)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(out) or ".") as tmp:
    npy = os.path.join(tmp, "rows.npy")
    rows = np.lib.format.open_memmap(npy, "w+", np.float32, (_ROWS.value, cfg.hidden_dim))
    with torch.no_grad():
      for start in range(0, _ROWS.value, _BLOCK.value):
        stop = min(start + _BLOCK.value, _ROWS.value)
        rows[start:stop] = model.sample(stop - start).numpy()
        if (start // _BLOCK.value) % 20 == 0:
          print(f"  {stop:,} / {_ROWS.value:,} rows ({time.time() - t0:.0f} s)", flush=True)
    rows.flush()
    del rows
    subprocess.run([sys.executable, "-m", "jaxsae.dump", f"--from_npy={npy}", f"--out={out}",
                    "--dtype=float32", "--nofilter_massive", "--noprogress"], check=True)
  tmp_truth = truth_path + ".tmp.npy"
  np.save(tmp_truth, truth)
  os.replace(tmp_truth, truth_path)   # last: its presence marks the pair complete
  with open(out + ".synth.json", "w") as f:
    json.dump({"generator": "sae_lens.synthetic.SyntheticModel (SynthSAEBench-16k values)",
               "seed": _SEED.value, "num_features": _FEATURES.value, "sample_seed": _SAMPLE_SEED.value, "rows": _ROWS.value,
               "config": cfg.to_dict()}, f, indent=1, default=str)
  print(f"{out}: {_ROWS.value:,} rows; {truth_path}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
  # Run as a script, bench/ is sys.path[0], where bench/kernels.py hides the `kernels` package
  # that transformers (imported by sae_lens) needs: drop it.
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(
      os.path.abspath(__file__))]
  flags.mark_flag_as_required("out")
  app.run(main)
