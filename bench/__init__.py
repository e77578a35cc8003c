"""Benchmarks (run as scripts from the repository root: `python bench/NAME.py`).

A package so that the scripts import their PyTorch peers as `bench.saelens_peer` /
`bench.sparsify_peer` (through bench/peers.py) with the repository root, not bench/, on sys.path:
bench/ itself must stay off sys.path, since bench/kernels.py would shadow the `kernels` package
that transformers (under sae-lens and sparsify) probes for.
"""
