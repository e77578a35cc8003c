"""A sweep on the built-in synthetic data: four SAEs (two rates x two seeds) trained in one job on
one read of the data, each in WORKDIR/members/<name>/ as a run of its own (jaxsae/sweep.py).

  python -m jaxsae.main --config=configs/sweep.py --workdir=/tmp/jaxsae_sweep
  python -m jaxsae.inspect /tmp/jaxsae_sweep          # the members' table
  python -m jaxsae.export --workdir=/tmp/jaxsae_sweep/members/lr=0.006,seed=0 --out=/tmp/sae

Members that differ only in rate and seed run stacked in one compiled step; add e.g.
{"sae.n": 4096} or {"sae.architecture": "batchtopk"} to the list for a member with its own step.
From the command line: --config.sweep="[{'train.lr': 2e-3}, {'sae.k': 16}]".
"""
from configs import quickstart
from jaxsae.sweep import grid

TARGET = quickstart.TARGET


def get_config():
  c = quickstart.get_config()
  c.sweep = grid({"train.lr": [3e-3, 6e-3], "train.seed": [0, 1]})
  return c
