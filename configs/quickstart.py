"""Built-in default: synthetic activations with known ground-truth features; ~1 min on 2 CPU cores.

1024 true features in superposition in d=128 (about 8 active per sample, uneven frequencies, noise).
Reports eval/gt_mmcs and eval/gt_recovered_frac (true features matched with cosine > 0.9).

  python -m jaxsae.main --config=configs/quickstart.py --workdir=/tmp/jaxsae_quickstart
"""
from configs import base

TARGET = {"hardware": "a 2-core CPU with 24 GiB (the CI machine)", "devices": 1,
          "device_memory": "24GiB"}


def get_config():
  c = base.get_config()
  c.data.source = "synthetic"
  c.data.normalize = "none"
  c.data.eval_rows = 8192
  c.sae.d = 128
  c.sae.n = 2048
  c.sae.k = 8
  c.sae.dead_tokens = 200_000
  c.train.steps = 800
  c.train.batch_size = 2048
  c.train.log_every = 100
  c.checkpoint.every_steps = 400
  return c
