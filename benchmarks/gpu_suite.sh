#!/usr/bin/env bash
# Every GPU measurement of the project, in one go (about 9 minutes on one H100/H200). The device
# tool stops a command at 10 minutes, so the suite keeps to SUITE_BUDGET (570 s) by construction:
# each section runs under its own limit cut to what the budget has left (a section with under
# 10 s left is skipped, and says so); the LANTON study, last, gets the rest.
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

SUITE_BUDGET="${SUITE_BUDGET:-570}"
RESERVE=0  # seconds a section leaves to the sections after it (the study's report)
SUITE_SECTIONS="${SUITE_SECTIONS:-}"  # e.g. "lanton_study lanton_report": only these (default all)

section() {  # section NAME SECONDS COMMAND...: run it, log it, report its status and time
  local name=$1 limit=$2 start=$SECONDS rc left
  shift 2
  if [[ -n "$SUITE_SECTIONS" && " $SUITE_SECTIONS " != *" $name "* ]]; then return 0; fi
  left=$((SUITE_BUDGET - SECONDS - RESERVE))
  if ((left < limit)); then limit=$left; fi
  if ((limit < 10)); then
    echo "== $name: skipped, ${left}s of the suite's ${SUITE_BUDGET}s budget left"
    return 124
  fi
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | grep -v -e '^I[0-9]\{4\} ' -e 'libtpu' | tee "$LOG_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start))s"
  return "$rc"
}

section env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
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

# Update only, GPT-2-small shapes (bf16 Newton-Schulz; target dmuon <= 0.25x optax muon). adamw,
# dmuon_fp32, lanton_ns2 and lanton_every4 were measured on an H200 on 2026-11-27
# (benchmarks/RESULTS.md): the anchors, lanton and the two estimates not yet measured run here.
section optim 90 python3 benchmarks/bench_optim.py --nocollectives --reps=20 \
  --variants=optax_muon,dmuon,lanton,lanton_every8,lanton_every4_ns2

# CAPO's share of the RL update step (target <= 1.03x).
section capo 150 python3 benchmarks/bench_capo.py --model=gpt2s --batch_size=32 --prompt_len=64 \
  --completion_len=448 --steps=5 --repeats=3

# In-memory OTA + FFG of 5 experts against the bandwidth anchor (target: exact ota_ffg >= 0.3x).
section merge 40 python3 benchmarks/bench_merge.py --memory_params_m=32 --disk_params_m=0 \
  --repeats=3

# LANTON study (docs/lm_experiments.md, "Isolating the noise adaptation"): D-Muon (A) and D-Muon
# with noise factors (E) on untied `small`, bf16, 64 x 256 tokens, 2,000 steps, seed 0 of each
# (configs/lm_sweep.py:noise_gpu:M; M = the probe's mapping, g4 or rel: LANTON_ARM). A runs
# first, so a stop at the limit still leaves A. The report (sweep.md, sweep.json: the final eval
# losses and E - A) and each run's metrics.jsonl go to $LOG_DIR/lanton_study/; the runs
# themselves (checkpoints) stay in /tmp. For a check of these lines on a CPU:
#   SUITE_SECTIONS="lanton_study lanton_report" LANTON_CONFIG=noise_smoke LANTON_STEPS=4 \
#     OUT=/tmp/suite bash benchmarks/gpu_suite.sh
# (LANTON_CONFIG=smoke LANTON_ARM= runs the older smoke sweep through the same lines.)
LANTON_CONFIG="${LANTON_CONFIG:-noise_gpu}"
LANTON_ARM="${LANTON_ARM-g4}"  # empty: a variant without a mapping suffix (e.g. smoke)
LANTON_VARIANT="$LANTON_CONFIG${LANTON_ARM:+:$LANTON_ARM}"
LANTON_DIR="${LANTON_DIR:-/tmp/lanton_study}"
lanton_overrides=()
if [[ -n "${LANTON_STEPS:-}" ]]; then
  lanton_overrides=(--config.base.total_steps="$LANTON_STEPS" --config.base.eval_every=0)
fi
RESERVE=25
section lanton_study 240 python3 experiments/sweep_lm.py \
  --config="configs/lm_sweep.py:$LANTON_VARIANT" --workdir="$LANTON_DIR" \
  "${lanton_overrides[@]}"
RESERVE=0
section lanton_report 25 bash -c 'python3 experiments/sweep_lm.py --report_only \
    --config="configs/lm_sweep.py:$0" --workdir="$1" "${@:3}" > /dev/null
  mkdir -p "$2/lanton_study"
  cp "$1"/sweep.md "$1"/sweep.json "$1"/sweep_eval_loss.png "$2/lanton_study/" 2> /dev/null
  (cd "$1" && find . -name metrics.jsonl -exec cp --parents {} "$2/lanton_study/" \;)
  python3 -c "
import json, sys
s = json.load(open(sys.argv[1] + \"/sweep.json\"))
for name, e in s[\"entries\"].items():
  for p in e[\"points\"]:
    print(name, \"lr\", p[\"learning_rate\"], \"final eval loss\", p[\"final_eval_loss\"])
for c in s[\"comparisons\"]:
  print(c[\"arm\"], \"-\", c[\"reference\"], c[\"differences\"], c[\"decision\"])
" "$2/lanton_study"' "$LANTON_VARIANT" "$LANTON_DIR" "$LOG_DIR" \
  "${lanton_overrides[@]}"

# RL study (docs/rl_experiments.md): the aggressive arms (GRPO, CAPO at the reference thresholds,
# CAPO at calibrated thresholds, the random mask at calibrated CAPO's rate) x 8 seeds
# (configs/rl_study.py:gpu) on the prepared SFT policy, in one process with JAX's persistent
# compilation cache (32 runs of the same programs: only the first compiles), seed by seed with
# the aggressive arms in the study's order, so a stop at the limit leaves whole paired seeds.
# Off unless RL_POLICY names the policy (a train_sft workdir carried to the machine, e.g.
# runs/rl_sft); RL_OVERRIDES holds the study's measured settings, e.g. "--config.tau_H=..
# --config.tau_F=.. --config.random_rate=.. --config.conservative_lr=.. --config.multiplier=..".
# It is not timed yet: run it alone, SUITE_SECTIONS="env rl_study rl_report" (the suite's
# other sections leave it nothing). The report of the seeds every arm finished (rl_study.md)
# and each run's metrics.jsonl go to $LOG_DIR/rl_study/. On a CPU, for these lines:
#   SUITE_SECTIONS="rl_study rl_report" RL_POLICY=DIR RL_CONFIG=smoke OUT=/tmp/suite \
#     RL_OVERRIDES="--config.seeds=(0,1)" bash benchmarks/gpu_suite.sh
RL_POLICY="${RL_POLICY:-}"
RL_CONFIG="${RL_CONFIG:-gpu}"
RL_DIR="${RL_DIR:-/tmp/rl_study}"
read -r -a rl_overrides <<< "${RL_OVERRIDES:-}"
if [[ -z "$RL_POLICY" ]]; then
  echo "== rl_study: skipped, RL_POLICY (the SFT policy's workdir) is not set"
else
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
  RESERVE=25
  section rl_study 545 python3 experiments/rl_study.py --config="configs/rl_study.py:$RL_CONFIG" \
    --workdir="$RL_DIR" --config.init_from="$RL_POLICY" "${rl_overrides[@]}"
  RESERVE=0
  section rl_report 25 bash -c 'python3 experiments/rl_study.py --report_only --finished_only \
      --config="configs/rl_study.py:$0" --workdir="$1" "${@:3}" > /dev/null
    mkdir -p "$2/rl_study"
    cp "$1"/rl_study.md "$1"/rl_accuracy.png "$1"/rl_masked.png "$2/rl_study/" 2> /dev/null
    (cd "$1" && find . -name metrics.jsonl -exec cp --parents {} "$2/rl_study/" \;)
    cat "$2/rl_study/rl_study.md"' "$RL_CONFIG" "$RL_DIR" "$LOG_DIR" "${rl_overrides[@]}"
fi
exit 0
