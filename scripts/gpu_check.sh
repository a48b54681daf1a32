#!/usr/bin/env bash
# One-shot GPU check (one GPU, under 8 minutes): writes <out>/gpu_check.json and <out>/gpu_check.md.
#
#   bash scripts/gpu_check.sh [out dir, default outputs/gpu_check]
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh    # print the commands only (the CPU test runs this)
#
# Steps (each under its own time limit; a failed or timed-out step is recorded in status.txt and the rest go on):
#   bench_7b, bench_13b  the benchmark suite at the 7B / 13B shapes: bf16, random weights, CLIP ViT-L + SAM ViT-H,
#                        plain LISA and LVLM_CSP's six presets, batch 1 and 8, eager and compiled (+compiled rows),
#                        CUDA peak memory per preset and batch
#   precision            bf16 vs fp32 [SEG] embeddings (cosine) and masks (IoU) on the tiny model
#   ds_zero2             train_ds.py under DeepSpeed ZeRO-2 on one GPU (tiny model, mode=lisa, bf16, 6 steps)
#   summary              one JSON and one Markdown table
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-outputs/gpu_check}"
DRY="${GPU_CHECK_DRY_RUN:-}"
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline YOLO_OFFLINE=1
mkdir -p "$OUT"
[ -n "$DRY" ] || : > "$OUT/status.txt"

# step <name> <seconds> <command...>: run it under `timeout`, record "<name> <exit> <seconds>"
step() {
  local name="$1" limit="$2"
  shift 2
  echo "+ [$name, <= ${limit}s] $(printf '%q ' "$@")"
  [ -n "$DRY" ] && return 0
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  echo "$name $code $((SECONDS - start))" >> "$OUT/status.txt"
  echo "  exit $code after $((SECONDS - start)) s (log: $OUT/$name.log)"
}

ONLY=p65,p70,p75,p80,p85,p90
step bench_7b 170 "$PY" -m scripts.benchmark --suite --shape 7b --device cuda --dtype bf16 --batches 1,8 \
  --only "$ONLY" --compiled --rounds 2 --warmup 1 --seg-first "" --out "$OUT/bench_7b.json"
step bench_13b 170 "$PY" -m scripts.benchmark --suite --shape 13b --device cuda --dtype bf16 --batches 1,8 \
  --only "$ONLY" --compiled --rounds 2 --warmup 1 --seg-first "" --out "$OUT/bench_13b.json"
step precision 40 "$PY" -m scripts.gpu_check precision --device cuda --out "$OUT/precision.json"
step ds_zero2 60 "$PY" train_ds.py mode=lisa train_data=miniature +miniature.seed=0 "output_dir=$OUT/ds_zero2" \
  "hydra.run.dir=$OUT/ds_zero2" model.device=cuda trainer.deepspeed=true trainer.precision=bf16 trainer.steps=6 \
  trainer.warmup_steps=2 trainer.batch_size=1 trainer.grad_accumulation=1 trainer.samples_per_image=1 \
  trainer.save_every=0 trainer.save_released=false trainer.progress_bar=false val.every=0
step summary 30 "$PY" -m scripts.gpu_check summary "$OUT"
[ -n "$DRY" ] || cat "$OUT/gpu_check.md"
