#!/usr/bin/env bash
# The prepared GPU checks of docs/benchmarks.md (SD3.5 Medium's architecture, random weights),
# for a session that is lent a GPU machine (the `device` tool). Run from the repository root:
#
#   docs/bench/gpu-session.sh wheels          # here, once: the wheels the GPU image lacks -> .whl/
#   docs/bench/gpu-session.sh speed|memory|fidelity|recipe   # there (carry .whl), one stage per call
#
# Each stage writes its JSON, PNG and log under $OUT (default runs/bench-gpu) and fits in ~8 min
# of an H200. The image there has torch (CUDA), transformers, peft, accelerate, pluggy, typer and
# rich, but not diffusers, osqp or this project: they travel as wheels (with the small packages the
# image may lack; a wheel of a package it has only shadows it under /tmp/site).
# Not yet run: no session so far was lent a GPU (docs/benchmarks.md says pending).
set -euo pipefail
stage=${1:?usage: gpu-session.sh wheels|speed|memory|fidelity|recipe}
OUT=${OUT:-runs/bench-gpu}
mkdir -p "$OUT"
if [ "$stage" = wheels ]; then
  grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
  rm -rf .whl && mkdir .whl
  plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
    -d .whl diffusers==0.42.1 osqp==1.1.3 qdldl joblib tomli-w ftfy wcwidth matplotlib contourpy cycler \
    fonttools kiwisolver pyparsing
  python3 -m pip wheel -q --no-deps -w .whl .
  ls -la .whl
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
marble() { python3 -m marble_cli.app "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
case "$stage" in
  speed)    marble bench speed --policy sd3.5-arch --out "$OUT" 2>&1 | tee "$OUT/speed.log" ;;
  memory)   marble bench memory --policy sd3.5-arch --prompts-per-step 2 --images-per-prompt 4 \
              --timesteps-per-image 2 --out "$OUT" 2>&1 | tee "$OUT/memory.log" ;;
  fidelity) marble bench fidelity --policy sd3.5-arch --fp32-reference --out "$OUT" 2>&1 | tee "$OUT/fidelity.log" ;;
  # The paper's recipe on SD3.5 Medium's architecture (random weights): every recipe option, the
  # sampler-grid timesteps, the weight EMA, a 40-step held-out evaluation and the best checkpoint,
  # 2 steps of a small batch; offline rewards (the recipe's need weights) on the recipe's prompts.
  recipe)   marble train --config sd35-marble --policy sd3.5-arch --rewards brightness,sharpness \
              --steps 2 --set prompts_per_step=3 --set images_per_prompt=2 --set timesteps_per_image=4 \
              --set eval_every=1 --set eval_max_prompts=3 --set checkpoint_every=1 --set sample_every=0 \
              --no-progress --out "$OUT/recipe" 2>&1 | tee "$OUT/recipe.log"
            cp "$OUT/recipe/metrics.jsonl" "$OUT/recipe-metrics.jsonl" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
