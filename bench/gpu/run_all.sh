#!/usr/bin/env bash
# The GPU benchmarks in one device call (10-minute limit): install the carried wheels, print the
# machine and versions, then run, in order, each under its own timeout and inside one overall
# budget, everything tee'd to $OUT:
#   tests    JAX_PLATFORMS=cuda python3 -m pytest -q tests/test_pallas_gpu.py   (~150 s on the H200)
#   tp16384  python3 bench/throughput.py --n=131072 --batch=16384 --dense=false \
#                --compute_dtype=bfloat16 --kernels=pallas --peers=saelens,sparsify,dictlearn
#   sweep    python3 bench/kernels.py --topk_sweep --batch=16384: the top-k kernel's knobs
#   tp4096   tp16384 at --batch=4096
#   kernels  python3 bench/kernels.py                          (its GPU defaults)
#   tpxla    (not in the default list) tp16384 with --kernels=xla,pallas: the xla path ran at a
#            tenth of pallas's speed on 2026-12-04 and its [B, n] buffers filled jax's memory
#            pool so that SAELens ran out of memory beside it; kernels=auto picks pallas on GPU
#   tplazy   (not in the default list) B=16384 with --lazy: each jaxsae step also under
#            train.lazy_optimizer, no peers
#   saesweep (not in the default list) python3 bench/sweep.py --steps=200: a 4-rate sweep of
#            d=576 n=4096 SAEs against the four runs one after the other (issue 19)
#   loader   (not in the default list) python3 bench/loader.py --rows=1048576, warm, with 2 and
#            with 8 reader threads (issue 3: does a many-core host reach 80% of the raw read?),
#            and cold with 8 where the page cache can be dropped (root)
# The benchmarks append to bench/RESULTS.md, which is then copied to $OUT (with the new rows alone
# in $OUT/new_rows.md).
#
#   bash bench/gpu/run_all.sh                 # everything
#   bash bench/gpu/run_all.sh tp4096 tp16384  # some steps only (e.g. a second call)
#
# Environment:
#   OUT              where logs and results go (the device tool sets it; default /tmp/jaxsae_gpu)
#   PYTHON           interpreter (default python3: the image's, the one that holds torch and jax)
#   RUN_ALL_BUDGET   seconds for the whole script (default 570, under the tool's 600)
#   SKIP_INSTALL=1   use the packages already installed
#   WHEELS_DIR       wheels to install (default bench/gpu/wheels, made by bench/gpu/wheels.sh)
#   JAXSAE_GPU_DRY=1 plumbing check on any machine (a CPU one too): tiny shapes, results into
#                    $OUT/RESULTS.md instead of bench/RESULTS.md
# BUILD.md ("Benchmarks on the GPU machine") has the device call.
set -u -o pipefail
T0=$SECONDS
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/jaxsae_gpu}
PY=${PYTHON:-python3}
BUDGET=${RUN_ALL_BUDGET:-570}
DRY=${JAXSAE_GPU_DRY:-0}
mkdir -p "$OUT"
LOG=$OUT/run_all.log
: >"$LOG"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
# jax and torch share the GPU in bench/throughput.py: jax takes memory as it needs it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

say() { echo "== [$((SECONDS - T0))s] $*" | tee -a "$LOG"; }

# run NAME TIMEOUT CMD...: CMD under min(TIMEOUT, what is left of the budget), output to the
# combined log and, except for install_*, to $OUT/NAME.log (the tool brings back 8 files at most).
run() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - T0) - 10))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then say "$name: skipped, ${left}s of the budget left"; return 0; fi
  say "$name (timeout ${limit}s): $*"
  local own=$OUT/$name.log
  [[ $name == install_* ]] && own=/dev/null
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$own" >>"$LOG"
  local rc=${PIPESTATUS[0]}
  say "$name: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)')"
}

if [[ $DRY == 1 ]]; then
  RESULTS=$OUT/RESULTS.md
  cp bench/RESULTS.md "$RESULTS"
  SHAPE=(--d=64 --n=1024 --k=8)
  B1=256 B2=1024
  KSHAPE=(--d=64 --n=1024 --k=8 --batch=256)
  SWEEP_SHAPE=(--d=64 --n=1024 --k=8 --k_aux=16 --batch=64 --reps=1 --interpret --flavor=gpu)
  LSHAPE=(--rows=16384 --chunk_rows=1024 --shard_rows=4096 --dims=64 --repeats=1)
  SAESWEEP=(--d=64 --n=1024 --batch=512 --steps=20)
  TEST_PLATFORM=cpu
else
  RESULTS=bench/RESULTS.md
  SHAPE=(--n=131072)
  B1=4096 B2=16384
  KSHAPE=()
  SWEEP_SHAPE=(--batch=16384)
  LSHAPE=(--rows=1048576)
  SAESWEEP=(--steps=200)
  TEST_PLATFORM=cuda   # tests/conftest.py makes CPU the default platform unless this is set
fi
LINES0=$(wc -l <"$RESULTS")

# ---- install ----------------------------------------------------------------------------------
if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
  shopt -s nullglob
  wheels=("${WHEELS_DIR:-bench/gpu/wheels}"/*.whl)
  if ((${#wheels[@]} == 0)); then
    say "no wheels in ${WHEELS_DIR:-bench/gpu/wheels} (carry it; bash bench/gpu/wheels.sh makes it)"
  else
    run install_wheels 120 "$PY" -m pip install -q --no-deps --no-index --no-compile \
        --disable-pip-version-check "${wheels[@]}"
  fi
  # --no-build-isolation: no network to fetch setuptools into an isolated build environment.
  run install_jaxsae 60 "$PY" -m pip install -q --no-deps --no-index --no-build-isolation \
      --disable-pip-version-check -e .
fi
# Whatever pip did, the checkout itself is importable.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# ---- machine and versions ---------------------------------------------------------------------
say "machine and versions"
{
  (nvidia-smi || echo "no nvidia-smi") 2>&1
  uptime
  nproc
  "$PY" - <<'EOF' 2>&1
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0])
for dist in ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "grain", "ml-collections",
             "torch", "triton", "transformers", "sae-lens", "transformer-lens", "eai-sparsify",
             "dictionary-learning", "einops", "jaxsae"):
  try:
    print(f"{dist} {md.version(dist)}")
  except md.PackageNotFoundError:
    print(f"{dist} MISSING")
import jax
print("jax devices:", jax.devices())
import torch
print("torch cuda:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for mod in ("jaxsae.train", "bench.peers"):
  importlib.import_module(mod)
from bench import peers
for name in peers.MODULES:
  try:
    print(name, peers.load(name).versions())
  except ImportError as e:
    print(name, "NOT LOADABLE:", e)
EOF
} >>"$LOG" 2>&1

# ---- steps ------------------------------------------------------------------------------------
STEPS=("$@")
((${#STEPS[@]} == 0)) && STEPS=(tests tp16384 sweep tp4096 kernels)
KERNELS_BENCH=${KERNELS_BENCH:-bench/kernels.py}
TP_COMMON=(--compute_dtype=bfloat16 --peers=saelens,sparsify,dictlearn --dense=false
           --steps=10 --rounds=3 --wait_quiet=30 --max_load=8 --results="$RESULTS")
for s in "${STEPS[@]}"; do
  case $s in
    tests)
      run tests 200 env JAX_PLATFORMS=$TEST_PLATFORM "$PY" -m pytest -q -p no:cacheprovider \
          tests/test_pallas_gpu.py ;;
    kernels)
      if [[ -f $KERNELS_BENCH ]]; then
        run kernels 150 "$PY" "$KERNELS_BENCH" "${KSHAPE[@]}" --results="$RESULTS"
      else
        say "kernels: $KERNELS_BENCH not found (set KERNELS_BENCH=...)"
      fi ;;
    sweep)
      run sweep 170 "$PY" bench/kernels.py --topk_sweep --sweep_budget=140 "${SWEEP_SHAPE[@]}" \
          --results="$RESULTS" ;;
    tp4096)
      run tp4096 150 "$PY" bench/throughput.py "${SHAPE[@]}" --batch=$B1 --kernels=pallas \
          "${TP_COMMON[@]}" ;;
    tp16384)
      run tp16384 180 "$PY" bench/throughput.py "${SHAPE[@]}" --batch=$B2 --kernels=pallas \
          "${TP_COMMON[@]}" ;;
    tpxla)
      run tpxla 200 "$PY" bench/throughput.py "${SHAPE[@]}" --batch=$B2 --kernels=xla,pallas \
          "${TP_COMMON[@]}" ;;
    tplazy)
      run tplazy 200 "$PY" bench/throughput.py "${SHAPE[@]}" --batch=$B2 --dense=false --lazy \
          --compute_dtype=bfloat16 --kernels=xla,pallas --peers= --steps=10 --rounds=3 \
          --wait_quiet=30 --max_load=8 --results="$RESULTS" ;;
    saesweep)
      run saesweep 200 "$PY" bench/sweep.py "${SAESWEEP[@]}" --results="$RESULTS" ;;
    loader)
      run loader 200 bash -c '
        py=$1; shift
        "$py" bench/loader.py --threads=2 --prefetch=2 "$@" || exit
        "$py" bench/loader.py --threads=8 --prefetch=8 "$@" || exit
        if [[ -w /proc/sys/vm/drop_caches ]]; then
          "$py" bench/loader.py --threads=8 --prefetch=8 --cold "$@"
        else
          echo "cold: skipped, /proc/sys/vm/drop_caches is not writable"
        fi' loader "$PY" "${LSHAPE[@]}" --results="$RESULTS" ;;
    *)
      say "unknown step $s (tests tp16384 sweep tp4096 kernels tpxla tplazy saesweep loader)" ;;
  esac
done

# ---- results ----------------------------------------------------------------------------------
tail -n +"$((LINES0 + 1))" "$RESULTS" >"$OUT/new_rows.md"
[[ $RESULTS != "$OUT/RESULTS.md" ]] && cp "$RESULTS" "$OUT/RESULTS.md"
say "done: $(wc -l <"$OUT/new_rows.md") new lines in $RESULTS; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
