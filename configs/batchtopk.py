"""BatchTopK on the shared fixture (SmolLM2-135M L15): k=32 latents per token on average over each
batch, a JumpReLU at inference (jaxsae/model.py). From the repository root, after making the
fixture's store as configs/smollm2_fixture.py says:

  python -m jaxsae.main --config=configs/batchtopk.py --workdir=/tmp/jaxsae_batchtopk
  python -m jaxsae.export --workdir=/tmp/jaxsae_batchtopk --format=saelens --out=/tmp/btk_saelens

The export is SAELens's "jumprelu" architecture (its threshold: the run's averaged one).
"""
from configs import smollm2_fixture

TARGET = smollm2_fixture.TARGET


def get_config():
  c = smollm2_fixture.get_config()
  c.sae.architecture = "batchtopk"
  return c
