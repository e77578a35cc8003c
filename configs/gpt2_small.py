"""GPT-2-small-sized dictionary: d=768, n=131072 (2^17), k=32, on one 80 GB GPU.

Activations of a d=768 residual stream (e.g. GPT-2 small, layer 8) in an activation store made by
`python -m jaxsae.dump`; ~1B tokens in batches of 16384; bf16 encoder GEMM, fp32 weights and Adam.

  python -m jaxsae.main --config=configs/gpt2_small.py --workdir=/shared/runs/gpt2_l8 \
      --config.data.path=/shared/stores/gpt2-small-L8

Planner (python -m jaxsae.plan --d=768 --n=131072 --k=32 --batch=16384 --devices=1
--device-memory=80GiB): peak 11.04 GiB per device (activations 8.04 GiB, the [B, n] pre-activations)
-> fits (14% of an 80 GiB H100).
"""
from configs import base

TARGET = {"hardware": "1x NVIDIA H100 80GB", "devices": 1, "device_memory": "80GiB"}


def get_config():
  c = base.get_config()
  c.data.source = "store"
  c.data.path = ""                  # required: the store of d=768 activations
  c.sae.d, c.sae.n, c.sae.k = 768, 131072, 32
  c.train.batch_size = 16384
  c.train.steps = 61_035            # ~1.0B tokens
  c.train.log_every = 200
  c.train.eval_every = 5000
  c.checkpoint.every_steps = 2000
  c.compute_dtype = "bfloat16"
  c.mesh.shape = (-1, 1)
  return c
