"""Real activations: SmolLM2-135M, residual stream after block 15, from the shared fixture.

65,536 rows of d=576 (float16) in ../shared/data, turned once into an activation store (~2 s),
then trained from the store like any other run. From the repository root:

  python -m jaxsae.dump --from-npy=../shared/data/smollm2-135m-L15.acts.f16.npy \
      --tokens-npy=../shared/data/smollm2-135m-L15.tokens.i32.npy \
      --out=/tmp/jaxsae/smollm2-135m-L15 --chunk_rows=1024 --shard_rows=16384
  python -m jaxsae.main --config=configs/smollm2_fixture.py --workdir=/tmp/jaxsae_smollm2

1024-row chunks give 64 chunks: 8 held out for eval (spread over the store), 56 to shuffle.
Another store: --config.data.path=STORE (and --config.sae.d / data.dtype to match it).
"""
from configs import base

TARGET = {"hardware": "a 2-core CPU with 24 GiB (the CI machine)", "devices": 1,
          "device_memory": "24GiB"}

STORE = "/tmp/jaxsae/smollm2-135m-L15"
MAKE_STORE = (
    "make it once, from the repository root: python -m jaxsae.dump "
    "--from-npy=../shared/data/smollm2-135m-L15.acts.f16.npy "
    "--tokens-npy=../shared/data/smollm2-135m-L15.tokens.i32.npy "
    f"--out={STORE} --chunk_rows=1024 --shard_rows=16384")


def get_config():
  c = base.get_config()
  c.data.source = "store"
  c.data.path = STORE
  c.data.missing_hint = MAKE_STORE
  c.data.dtype = "float16"       # the fixture's dtype; a store of another dtype stops the run
  c.data.eval_rows = 8192
  c.data.eval_batches = 2
  c.data.shuffle_buffer_chunks = 8
  c.sae.d = 576
  c.sae.n = 4096
  c.sae.k = 32
  c.sae.dead_tokens = 200_000    # scaled down from 10M: the whole run sees ~600k tokens
  c.train.steps = 150            # ~11 passes over the 57k training rows
  c.train.batch_size = 4096
  c.train.init_rows = 16384
  c.train.log_every = 10
  c.checkpoint.every_steps = 50
  return c
