"""Matryoshka BatchTopK on the shared fixture (SmolLM2-135M L15): BatchTopK selection, trained as
nested dictionaries of the first n/16, n/4 and all n latents (jaxsae/model.py). From the
repository root, after making the fixture's store as configs/smollm2_fixture.py says:

  python -m jaxsae.main --config=configs/matryoshka.py --workdir=/tmp/jaxsae_matryoshka

Exports as configs/batchtopk.py's do (a JumpReLU); the nested order is the latents' index order.
"""
from configs import batchtopk

TARGET = batchtopk.TARGET


def get_config():
  c = batchtopk.get_config()
  c.sae.architecture = "matryoshka_batchtopk"
  c.sae.matryoshka_prefixes = (1 / 16, 1 / 4)
  return c
