"""A 16M-latent dictionary on a TPU v5p pod slice: d=4096 (Llama-3-8B's residual width),
n=2^24, k=64, latents split over 64 chips, blocked encoder.

  launch/tpu_pod.sh --name=sae-16m --zone=ZONE --project=PROJECT --accelerator-type=v5p-128 \
      --workdir=gs://BUCKET/runs/dict_16m -- --config=configs/dict_16m.py \
      --config.data.path=gs://BUCKET/stores/llama3-8b-L16

Planner (python -m jaxsae.plan --d=4096 --n=16777216 --k=64 --batch=8192 --devices=64
--device-memory=95GiB --encoder-tile=32768): mesh (data=1, model=64), peak 52.01 GiB per chip
(params 8, Adam 16, gradients 8, update temporaries 20 GiB) -> fits (55% of a v5p chip's 95 GiB).
The same dictionary does not fit an 8-GPU node (8 x 80 GB): with power-of-two latent splits the
planner's smallest fitting mesh is 64 devices of 80 GB, with fp32 or bf16 Adam moments.
"""
from configs import base

TARGET = {"hardware": "TPU v5p-128 (64 chips, 95 GiB HBM each)", "devices": 64,
          "device_memory": "95GiB"}


def get_config():
  c = base.get_config()
  c.data.source = "store"
  c.data.path = ""                  # required: a store of d=4096 activations (gs:// works)
  c.sae.d, c.sae.n, c.sae.k = 4096, 2 ** 24, 64
  c.train.batch_size = 8192
  c.train.steps = 244_140           # ~2.0B tokens
  c.train.log_every = 200
  c.train.eval_every = 20_000
  c.checkpoint.every_steps = 1000
  c.compute_dtype = "bfloat16"
  c.encoder_tile = 32768
  c.mesh.shape = (1, -1)            # every chip holds n/64 latents
  return c
