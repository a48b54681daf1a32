#!/usr/bin/env bash
# The paper's mIoU* protocol (Table 6): for every column (plain LISA and the pruning ratios 65..90%), fine-tune
# ONLY SAM's mask decoder with that column's LVLM_CSP schedule active in the frozen LLaVA, then evaluate the
# column with its own decoder (row labelled "(mIoU*)", drop = mIoU*_drop against plain LISA's released decoder).
#
#   LISA_WEIGHTS=/data/weights LISA_DATASET_DIR=/data/lisa_dataset scripts/finetune_mask_decoder.sh
#   MODEL=llava7b_336 LAUNCH="deepspeed --num_gpus 8" scripts/finetune_mask_decoder.sh trainer.steps=2000
#   DRY_RUN=1 scripts/finetune_mask_decoder.sh          # print the commands only
#
# Environment: MODEL (llava7b_224 | llava7b_336 | llava13b_224; default llava7b_224), TRAIN_DATA (a configs/train_data
# group, default refcoco), OUT (default outputs/finetune_mask_decoder/$MODEL), LAUNCH (default python),
# EVAL_ARGS (extra eval_ds.py overrides). Arguments are extra train_ds.py overrides.
# The decoder cache of each column lives in its run directory (features differ per schedule).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-llava7b_224}
TRAIN_DATA=${TRAIN_DATA:-refcoco}
OUT=${OUT:-outputs/finetune_mask_decoder/$MODEL}
LAUNCH=${LAUNCH:-python}
EVAL_ARGS=${EVAL_ARGS:-}
COLUMNS=(baseline p65 p70 p75 p80 p85 p90)

run() {
  echo "+ $*"
  if [[ -z "${DRY_RUN:-}" ]]; then eval "$@"; fi
}

# plain LISA with its released decoder: the reference of every mIoU*_drop
run "$LAUNCH eval_ds.py +exp=${MODEL}_baseline hydra.run.dir=$OUT/plain $EVAL_ARGS"
for column in "${COLUMNS[@]}"; do
  schedule=""
  if [[ "$column" != baseline ]]; then schedule="schedule=${MODEL}_${column}"; fi
  run "$LAUNCH train_ds.py mode=decoder model=$MODEL $schedule train_data=$TRAIN_DATA name=decoder_${MODEL}_${column} hydra.run.dir=$OUT/$column/train $*"
  run "$LAUNCH eval_ds.py +exp=${MODEL}_${column} model.mask_decoder=$OUT/$column/train/mask_decoder.safetensors baseline=$OUT/plain/metrics.json hydra.run.dir=$OUT/$column/eval $EVAL_ARGS"
done
if [[ -z "${DRY_RUN:-}" ]]; then
  cat "$OUT/plain/table.txt"
  for column in "${COLUMNS[@]}"; do tail -n +2 "$OUT/$column/eval/table.txt" | head -1; done
fi
