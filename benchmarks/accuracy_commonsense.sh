#!/usr/bin/env bash
# FFBA, zFLoRA and LoRA at a matched parameter budget on the embedded SmolLM2-135M-Instruct:
# same recipe and seed, trained on a balanced commonsense subset, evaluated by log-likelihood
# scoring on the first LIMIT test examples of each of the eight commonsense sets.
# Usage: benchmarks/accuracy_commonsense.sh [OUT_DIR]   (env: TRAIN_LIMIT, LIMIT, FFLORA, METHODS)
set -euo pipefail
OUT=${1:-runs/accuracy-commonsense}
TRAIN_LIMIT=${TRAIN_LIMIT:-1600}
LIMIT=${LIMIT:-200}
FFLORA=${FFLORA:-.venv/bin/fflora}
METHODS=${METHODS:-ffba zflora lora}
RECIPE=(--task commonsense --train-limit "$TRAIN_LIMIT" --epochs 1 --batch-size 8 --lr 3e-4 --seed 42
        --lora-rank 8 --lora-alpha 16 --save-steps 50 --logging-steps 10)

$FFLORA data prepare --tasks commonsense
for method in $METHODS; do
  extra=(); [ "$method" != lora ] && extra=(--match-params --alpha 16 --rank 8)  # FFBA r=10, zFLoRA r=13
  resume=(); [ -f "$OUT/$method/train_config.json" ] && resume=(--resume)
  [ -f "$OUT/$method/run.json" ] || $FFLORA train --method "$method" "${RECIPE[@]}" "${extra[@]}" "${resume[@]}" --output-dir "$OUT/$method"
  [ -f "$OUT/$method/eval.json" ] || $FFLORA eval --adapter "$OUT/$method" --task commonsense --mode loglik --limit "$LIMIT" --output "$OUT/$method/eval.json"
done
$FFLORA eval --method base --task commonsense --mode loglik --limit "$LIMIT" --output "$OUT/base/eval.json"
