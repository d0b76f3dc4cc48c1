#!/usr/bin/env bash
# Every GPU measurement of the project, in one go (about 7 minutes on one H100/H200; the
# sections' limits add up to 10).
# XLA's GPU compile of one gpt2s step takes ~35 s on an H200 (2026-11-27), so each section times
# few programs: the limits below leave the other sections their time.
#   On the device machine, from the repository root:  bash benchmarks/gpu_suite.sh
# Each section runs under its own time limit and a failing section does not stop the others; each
# one's output also goes to $LOG_DIR/NAME.log ($LOG_DIR defaults to $OUT where that is set).
# The GPU image lacks tensorflow-datasets and ml_collections: carry their wheels in .whl/
# (BUILD.md says how); they are installed into /tmp/site here when present.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${LOG_DIR:-${OUT:-/tmp/gpu_suite}}"
mkdir -p "$LOG_DIR"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9

section() {  # section NAME SECONDS COMMAND...: run it, log it, report its status and time
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | grep -v -e '^I[0-9]\{4\} ' -e 'libtpu' | tee "$LOG_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start))s"
  return "$rc"
}

section env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "
import importlib
for m in (\"jax\", \"jaxlib\", \"flax\", \"optax\", \"orbax.checkpoint\", \"chex\", \"numpy\",
          \"ml_collections\", \"tensorflow_datasets\"):
  try:
    print(m, getattr(importlib.import_module(m), \"__version__\", \"?\"))
  except Exception as e:
    print(m, \"MISSING\", type(e).__name__, e)
import jax; print(jax.devices())
import curvopt.train, curvopt.rl, curvopt.merge; print(\"curvopt imports ok\")"'

# LANTON's whole step against D-Muon's (target <= 1.04x), with the method's every-step noise
# estimate and the cheapest one that kept the loss on the CPU sweeps (every 8 steps); MFU of each.
# (AdamW's MFU was measured: 33.8% on an H200. Four gpt2s programs fit the limit.)
section train_step 230 python3 benchmarks/bench_train_step.py --models=gpt2s --batch_size=16 \
  --seq_len=1024 --steps=5 --repeats=3 --attention_impl=cudnn \
  --optimizers=dmuon,lanton,lanton+lanton_noise_every=8

# Update only, GPT-2-small shapes (bf16 Newton-Schulz; target dmuon <= 0.25x optax muon).
section optim 120 python3 benchmarks/bench_optim.py --nocollectives --reps=20 \
  --variants=adamw,optax_muon,dmuon,dmuon_fp32,lanton,lanton_ns2,lanton_every4,lanton_every8,lanton_every4_ns2

# CAPO's share of the RL update step (target <= 1.03x).
section capo 150 python3 benchmarks/bench_capo.py --model=gpt2s --batch_size=32 --prompt_len=64 \
  --completion_len=448 --steps=5 --repeats=3

# In-memory OTA + FFG of 5 experts against the bandwidth anchor (target >= 0.5x).
section merge 40 python3 benchmarks/bench_merge.py --memory_params_m=32 --disk_params_m=0 \
  --repeats=3
exit 0
