#!/usr/bin/env bash
# Every GPU measurement of the project, in one go (budget: under 8 minutes on one H100/H200).
#   On the device machine, from the repository root:  bash benchmarks/gpu_suite.sh
# The GPU image lacks tensorflow-datasets and ml_collections: carry their wheels in .whl/
# (BUILD.md says how); they are installed into /tmp/site here when present.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'

echo '== train step: gpt2s, bf16 compute, fp32 params (MFU) =='
timeout 240 python3 benchmarks/bench_train_step.py --models=gpt2s --batch_size=16 --seq_len=1024 \
  --steps=10 --repeats=3 --optimizers=adamw,dmuon,lanton

echo '== optimizer update only, GPT-2-small shapes: adamw, optax muon, dmuon, lanton (bf16 NS) =='
timeout 150 python3 benchmarks/bench_optim.py --nocollectives --reps=5

echo '== CAPO mask overhead on the RL update step: gpt2s =='
timeout 150 python3 benchmarks/bench_capo.py --model=gpt2s --batch_size=32 --prompt_len=64 \
  --completion_len=448 --steps=5 --repeats=3
