"""jaxsae: top-k sparse autoencoders trained at scale in JAX.

Entry points: `python -m jaxsae.main` (train), `jaxsae.dump` (activation stores), `jaxsae.plan`
(memory), `jaxsae.export` (SAELens / sparsify / npz), `jaxsae.inspect` (a run or an export),
`jaxsae.evaluate` (spliced LM loss, KL, FVU of an SAE in its model), `jaxsae.plot` (pictures).
From Python: `jaxsae.train.train_and_evaluate(config, workdir)`.
"""
