"""A 1M-latent dictionary on an 8-chip TPU slice: d=2304 (Gemma-2-2B's residual width),
n=2^20, k=64, latents split over the 8 chips, blocked encoder.

  launch/tpu_pod.sh --name=sae-1m --zone=ZONE --project=PROJECT --accelerator-type=v6e-8 \
      --workdir=gs://BUCKET/runs/dict_1m -- --config=configs/dict_1m.py \
      --config.data.path=gs://BUCKET/stores/gemma2-2b-L12

Planner (python -m jaxsae.plan --d=2304 --n=1048576 --k=64 --batch=8192 --devices=8
--device-memory=32GiB --encoder-tile=16384): mesh (data=1, model=8), peak 14.63 GiB per chip
(params 2.25, Adam 4.50, gradients 2.25, update temporaries 5.62 GiB) -> fits (46% of a v6e chip's
32 GiB). On v5e chips (16 GiB) it would need 91%: use train.opt_state_dtype=bfloat16 there.
"""
from configs import base

TARGET = {"hardware": "TPU v6e-8 (8 chips, 32 GiB HBM each)", "devices": 8,
          "device_memory": "32GiB"}


def get_config():
  c = base.get_config()
  c.data.source = "store"
  c.data.path = ""                  # required: a store of d=2304 activations (gs:// works)
  c.sae.d, c.sae.n, c.sae.k = 2304, 2 ** 20, 64
  c.train.batch_size = 8192
  c.train.steps = 122_070           # ~1.0B tokens
  c.train.log_every = 200
  c.train.eval_every = 10_000
  c.checkpoint.every_steps = 2000
  c.compute_dtype = "bfloat16"
  c.encoder_tile = 16384
  c.mesh.shape = (1, -1)            # every chip holds n/8 latents
  return c
