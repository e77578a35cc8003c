"""A transcoder on SmolLM2-135M: block 15's MLP output rebuilt from the MLP's input (model.py).

The two hooks come from one pass of the model over text (row-aligned stores, jaxsae/dump.py), here
the model and corpus that bench/make_datasets.sh fetches offline. From the repository root:

  python -m jaxsae.dump --model=/tmp/jaxsae/models/smollm2-135m --layer=15 \\
      --hooks=mlp_in,mlp_out --text=/tmp/jaxsae/corpus/train --tokens=614400 --seq_len=256 \\
      --compute_dtype=bfloat16 --out=/tmp/jaxsae/smollm2-L15-mlp
  python -m jaxsae.main --config=configs/transcoder.py --workdir=/tmp/jaxsae_transcoder
  python -m jaxsae.export --workdir=/tmp/jaxsae_transcoder --format=sparsify --out=/tmp/tc_sparsify

Add --config.sae.skip=True for a skip transcoder (a linear x -> y term beside the latents). The
export above is sparsify's transcoder layout; SAELens loads transcoders that encode with a
threshold, so train --config.sae.architecture=batchtopk and export --format=saelens for it.
"""
from configs import smollm2_fixture

TARGET = smollm2_fixture.TARGET
DUMP = "/tmp/jaxsae/smollm2-L15-mlp"


def get_config():
  c = smollm2_fixture.get_config()
  c.data.path = f"{DUMP}/mlp_in"
  c.data.target_path = f"{DUMP}/mlp_out"
  c.data.dtype = ""   # the dump's bfloat16
  c.data.missing_hint = ("make the two stores once, with the jaxsae.dump command in "
                         "configs/transcoder.py's docstring")
  return c
