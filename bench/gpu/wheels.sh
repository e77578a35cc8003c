#!/usr/bin/env bash
# Downloads, into bench/gpu/wheels/ (git-ignored), the Python 3.12 x86_64 wheels that the GPU
# benchmark machine lacks, so that bench/gpu/run_all.sh can install them there with no network.
# Run on a networked machine, from anywhere:   bash bench/gpu/wheels.sh
#
# The GPU image ('cuda', /work/.library/device/KINDS.md) already holds python3.12, jax 0.11.2
# (cuda13), flax, optax, orbax-checkpoint, tensorstore, torch 2.11 + triton, transformers 5.17,
# huggingface-hub 1.33, safetensors, accelerate, absl-py, etils, einops, jaxtyping, numpy, pandas,
# pyarrow, xxhash, fsspec, requests, pyyaml, protobuf, tqdm, rich, pytest. What is missing is
# listed below, each pinned to the version the CPU runs in bench/RESULTS.md used, and each fetched
# with --no-deps: the list is closed by hand over what jaxsae, its tests and the peers import at
# run time. Checked (2026-11-21) by installing exactly these wheels into a fresh environment holding
# only packages of the image's list (transformers 5.17.0, huggingface-hub 1.33.0, accelerate 1.15.0;
# but Python 3.11, jax 0.10.2 and torch 2.13 CPU, the newest reachable here) and running
# `JAXSAE_GPU_DRY=1 bash bench/gpu/run_all.sh` there, and by installing and importing the cp312
# wheels under Python 3.12. sae-lens needs wandb at import time (20 MiB of the 31), and wandb its
# pydantic and opentelemetry packages. Requirements that are declared but never imported on these
# paths (sae-lens's plotly, nltk, babe, python-dotenv, tenacity; transformer-lens's beartype,
# typeguard, fancy-einsum, transformers-stream-generator) are left out to keep the carried folder
# small; pip install --no-deps does not check them. dictionary-learning's trainers import only torch
# and einops (both in the image); its declared nnsight, circuitsvis, umap-learn, plotly, datasets,
# wandb, zstandard and llvmlite are never imported by bench/dictlearn_peer.py (it skips the
# package's __init__, which imports nnsight).
set -euo pipefail
cd "$(dirname "$0")"
DEST=wheels
PYTHON=${PYTHON:-python3}

PKGS=(
  # jaxsae itself (pyproject dependencies missing from the image) and its tests
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0 tensorboardX==2.6.5
  crc32c==2.9.post0
  # SAELens peer: sae-lens imports transformer_lens and wandb at import time
  sae-lens==6.54.12 transformer-lens==3.9.0 better-abc==0.0.3
  wandb==0.31.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
  typing-inspection==0.4.2 platformdirs==4.14.7
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
  opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-exporter-http-transport==0.66b2
  opentelemetry-proto==1.45.2 googleapis-common-protos==1.76.0
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  simple-parsing==0.1.9 docstring-parser==0.18.0
  # sparsify peer
  eai-sparsify==1.3.3 natsort==8.4.0 schedulefree==1.4.1
  # dictionary_learning peer (a py3-none-any wheel; its trainers need only torch and einops)
  dictionary-learning==0.1.0
)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
for p in "${PKGS[@]}"; do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --abi cp312 --abi abi3 --abi none \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 --platform any -d "$DEST" "$p" 2>&1 | grep -v "is ignored" || true
  ls "$DEST" | grep -qi "^$(echo "${p%%==*}" | tr -- '-' '_')-" || { echo "FAILED: $p"; exit 1; }
done
ls -l "$DEST"
echo "total: $(du -sh "$DEST" | cut -f1) in $(ls "$DEST"/*.whl | wc -l) wheels"
