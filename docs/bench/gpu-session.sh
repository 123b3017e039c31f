#!/usr/bin/env bash
# The prepared GPU checks of docs/benchmarks.md (SD3.5 Medium's and FLUX.1-dev's architectures,
# random weights), for a session that is lent a GPU machine (the `device` tool). Run from the
# repository root:
#
#   docs/bench/gpu-session.sh wheels     # here, once: the wheels the GPU image lacks -> .whl/
#   docs/bench/gpu-session.sh all        # there (carry .whl): THE one call, ~7.5 min of an H200
#   docs/bench/gpu-session.sh speed|counts|memory|fidelity|options|recipe   # one stage per call
#   docs/bench/gpu-session.sh flux       # a call of its own: the benches on FLUX.1-dev's architecture
#
# `all` runs, each under its own time limit (460 s together, + the wheels' install; a stage past
# its limit gets SIGINT, 20 s to end, then SIGKILL), so that the call ends within ~8 minutes:
#   speed   (~4 min)  the six variants + the two stacked ones, rounds until periodic's interval is
#                     within +-1 % or 3 minutes of rounds have passed; CUDA events per phase,
#                     bootstrap intervals for every ratio (speed.json, speed.png; cut by its
#                     limit, it still writes and prints the rounds it finished);
#   counts  (~1.5 min) one profiled step of $COUNT_VARIANTS (default: single, the variant of the
#                     "kernels halved" target): kernels, launches, syncs, casts per phase and pass;
#   memory  (~1.5 min) single and affine, one step each in a fresh process: the whole step's peak
#                     and the gradient phase's (memory.json).
# `options` (a second call, ~6 min) measures what is opt-in: gradient_checkpointing="auto"
# (activations kept when they fit) and compile=true (no-grad forwards through torch.compile).
# `recipe` (a call of its own) smoke-tests the paper's recipe on the architecture (issue 27).
# `flux` (a call of its own, ~7.5 min) runs speed (the six variants), memory (single, affine) and
# fidelity on FLUX.1-dev's architecture (`flux-arch`: 11.9 B parameters, random weights) with a
# smaller batch than SD3.5's (4 rows of 1024 image + 128 T5 tokens) into $OUT/flux; its sizes and
# time limits are estimates, not yet measured.
#
# Each stage writes its JSON (and PNG) under $OUT (default runs/bench-gpu), all output goes to
# $OUT/session.log: `all` leaves 5 files (the device tool returns at most 8). The image there
# has torch (CUDA), transformers, peft, accelerate, pluggy, typer and rich, but not diffusers,
# osqp or this project: they travel as wheels (with the small packages the image may lack; a
# wheel of a package it has only shadows it under /tmp/site).
#
# GPU_SESSION_CPU_TEST=1 runs the same stages on this CPU with tiny-sd3 and tiny settings (no
# wheels, no nvidia-smi): how the stages are checked before a GPU call. `recipe` runs there on
# `sd3.5`'s loader pointed at the tiny prior at its 64 px (tiny-sd3 takes no `resolution`, which
# the recipe sets), every other recipe option as on the GPU. PY=.venv/bin/python picks the venv.
set -euo pipefail
stage=${1:?usage: gpu-session.sh wheels|all|speed|counts|memory|fidelity|options|recipe|flux}
OUT=${OUT:-runs/bench-gpu}
mkdir -p "$OUT"
if [ "$stage" = wheels ]; then
  exclude=$(git rev-parse --git-path info/exclude)  # .git is a file in a worktree: ask git where
  mkdir -p "$(dirname "$exclude")"
  grep -qsx '/.whl/' "$exclude" || echo /.whl/ >> "$exclude"
  rm -rf .whl && mkdir .whl
  plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
    -d .whl diffusers==0.42.1 osqp==1.1.3 qdldl joblib tomli-w ftfy wcwidth matplotlib contourpy cycler \
    fonttools kiwisolver pyparsing
  python3 -m pip wheel -q --no-deps -w .whl .
  ls -la .whl
  exit 0
fi
if [ "${GPU_SESSION_CPU_TEST:-0}" = 1 ]; then
  PY=${PY:-python3}
  POLICY=(--policy tiny-sd3)
  SIZE=(--prompts-per-step 2 --images-per-prompt 2 --timesteps-per-image 2 --sample-steps 1)
  SPEED=(--rounds 3 --min-rounds 2 --warmup 1 --max-minutes 1 --scoring-rounds 0)  # as on the GPU: no scoring section
  FIDELITY=(--steps 2 "${SIZE[@]}")
  RECIPE_POLICY=(--policy sd3.5 --policy-opt path=plugins/policies/tiny_sd3 --policy-opt resolution=64
                 --policy-opt max_sequence_length=1)
  MEMORY=(--steps 1 --prompts-per-step 2 --images-per-prompt 2 --timesteps-per-image 2 --sample-steps 1)
  FLUX_POLICY=("${POLICY[@]}")  # flux-arch needs a GPU: the CPU check runs the stage's commands on tiny-sd3
  FLUX_SIZE=("${SIZE[@]}")
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
  PY=python3
  POLICY=(--policy sd3.5-arch)
  SIZE=()
  SPEED=(--max-minutes 3 --warmup 1)
  FIDELITY=()
  RECIPE_POLICY=("${POLICY[@]}")
  MEMORY=(--steps 1 --prompts-per-step 2 --images-per-prompt 4 --timesteps-per-image 2 --sample-steps 10)
  FLUX_POLICY=(--policy flux-arch --policy-opt max_sequence_length=128)
  FLUX_SIZE=(--prompts-per-step 2 --images-per-prompt 2 --timesteps-per-image 1 --sample-steps 6)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/session.log"
fi
export PYTHONUNBUFFERED=1
MARBLE=("$PY" -m marble_cli.app)  # (timeout runs programs, not shell functions)
ALL_VARIANTS=single,weighted-sum,marble-affine,marble-periodic,marble-exact,marble-rows,marble-affine-stacked,marble-rows-stacked
COUNT_VARIANTS=${COUNT_VARIANTS:-single}

run_stage() {  # name, time limit (s), command...: its output appended to $OUT/session.log, its status kept
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS status=0
  echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/session.log"
  timeout --signal=INT --kill-after=20 "$limit" "$@" >> "$OUT/session.log" 2>&1 || status=$?
  echo "== $name rc=$status in $((SECONDS - start)) s" | tee -a "$OUT/session.log"
}

speed_stage() {
  run_stage speed 260 "${MARBLE[@]}" bench speed "${POLICY[@]}" "${SIZE[@]}" "${SPEED[@]}" --variants "$ALL_VARIANTS" \
    --out "$OUT"
}
counts_stage() {
  run_stage counts 100 "${MARBLE[@]}" bench counts "${POLICY[@]}" "${SIZE[@]}" --variants "$COUNT_VARIANTS" --out "$OUT"
}
memory_stage() {
  run_stage memory 100 "${MARBLE[@]}" bench memory "${POLICY[@]}" "${MEMORY[@]}" --variants single,marble-affine \
    --out "$OUT"
}

case "$stage" in
  all) speed_stage; counts_stage; memory_stage ;;
  speed) speed_stage ;;
  counts) counts_stage ;;
  memory) memory_stage ;;
  fidelity) run_stage fidelity 450 "${MARBLE[@]}" bench fidelity "${POLICY[@]}" "${FIDELITY[@]}" --fp32-reference \
    --out "$OUT" ;;
  options)
    mkdir -p "$OUT/auto" "$OUT/compile"
    run_stage speed-auto 200 "${MARBLE[@]}" bench speed "${POLICY[@]}" "${SIZE[@]}" --max-minutes 2 \
      --scoring-rounds 0 --variants single,marble-affine,marble-rows,marble-affine-stacked \
      --policy-opt 'gradient_checkpointing="auto"' --out "$OUT/auto"
    run_stage speed-compile 200 "${MARBLE[@]}" bench speed "${POLICY[@]}" "${SIZE[@]}" --max-minutes 1.5 \
      --scoring-rounds 0 --variants single,marble-affine,marble-rows --policy-opt compile=true --out "$OUT/compile" ;;
  # The paper's recipe on SD3.5 Medium's architecture (random weights): every recipe option, the
  # sampler-grid timesteps, the weight EMA, a 40-step held-out evaluation and the best checkpoint,
  # 2 steps of a small batch; offline rewards (the recipe's need weights) on the recipe's prompts.
  recipe)
    run_stage recipe 480 "${MARBLE[@]}" train --config sd35-marble "${RECIPE_POLICY[@]}" \
      --rewards brightness,sharpness --steps 2 --set prompts_per_step=3 --set images_per_prompt=2 --set timesteps_per_image=4 \
      --set eval_every=1 --set eval_max_prompts=3 --set checkpoint_every=1 --set sample_every=0 \
      --no-progress --out "$OUT/recipe"
    [ ! -f "$OUT/recipe/metrics.jsonl" ] || cp "$OUT/recipe/metrics.jsonl" "$OUT/recipe-metrics.jsonl" ;;
  flux)
    mkdir -p "$OUT/flux"
    run_stage flux-speed 250 "${MARBLE[@]}" bench speed "${FLUX_POLICY[@]}" "${FLUX_SIZE[@]}" "${SPEED[@]}" \
      --variants single,weighted-sum,marble-affine,marble-periodic,marble-exact,marble-rows --out "$OUT/flux"
    run_stage flux-memory 100 "${MARBLE[@]}" bench memory "${FLUX_POLICY[@]}" "${FLUX_SIZE[@]}" --steps 1 \
      --variants single,marble-affine --out "$OUT/flux"
    run_stage flux-fidelity 110 "${MARBLE[@]}" bench fidelity "${FLUX_POLICY[@]}" "${FLUX_SIZE[@]}" --steps 2 \
      --fp32-reference --out "$OUT/flux" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
