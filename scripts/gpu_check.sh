#!/usr/bin/env bash
# The first run on a lent GPU (one H200, Python 3.12, torch+CUDA; no deepspeed/webdataset, no network):
# installs the carried wheels, builds the tiny inputs (tiny Llama + tiny CLIP + synthetic shards, nothing
# downloaded), then per configuration trains configs/tiny_cpu.yaml for 10 steps on 1 rank under torchrun
# (NCCL) in bf16, resumes once, exports and embeds. Prints one `PASS <config>` / `FAIL <config> (<reason>)`
# (or `SKIP <config> (<reason>)`) line per configuration; exits 1 on any FAIL. See docs/training.md.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: bash scripts/gpu_check.sh [--out DIR] [--work DIR] [--wheels DIR] [--offload] [--dry-run] [--help]

The first GPU run of the training stack, in one device call (see docs/training.md):

  setup                      install the wheels of --wheels (scripts/gpu_wheels.sh fills .whl/) with
                             pip --no-index --no-deps --target $GPU_CHECK_SITE (default /tmp/site),
                             unless deepspeed, webdataset and transformers 5.23.0 import already;
                             build tiny inputs (tiny Llama + tiny CLIP + synthetic shards)
  zero3-bf16-sdpa            ds_configs/zero3_bf16.json, attn sdpa: train 6 steps, resume to 10,
                             export, embed
  zero2-bf16-sdpa            ds_configs/zero2_bf16.json, attn sdpa: train 6, resume to 10, export, embed
  zero3-bf16-lora            ds_configs/zero3_bf16.json, attn sdpa, LoRA (model.llm.lora: bf16 adapters,
                             keyed dropout 0.1) in chunks of 2 pairs: train 6, resume to 10, export
                             (merges the adapters), embed
  zero3-bf16-fa2             ds_configs/zero3_bf16.json, flash_attention_2: train 10, export
                             (SKIP where flash_attn does not import)
  zero3-offload-bf16-sdpa    ds_configs/zero3_offload.json (compiles DeepSpeedCPUAdam, ~3 min): train
                             10, export; only with --offload, and last

Every run: torchrun --standalone --nproc-per-node 1, train.precision=bf16, 1 rank (NCCL on a GPU).
Embedding uses `embed --device cuda --part-every 2` (the model on cuda:0, a part every 2 batches):
UNVERIFIED, no GPU run of it yet (written on a CPU machine; tests/launcher/eval/test_embed_parts.py
covers the CPU path and the device refusal).

options:
  --out DIR      logs: setup.log, one <config>.log per configuration, summary.txt (default gpu_check_out;
                 at most 7 files, so that the device tool brings them all back from $OUT: it takes 8)
  --work DIR     inputs, runs, checkpoints, exports (default: a new /tmp/gpu_check.XXXXXX)
  --wheels DIR   the carried wheel folder (default .whl in the repo root)
  --offload      also run zero3-offload-bf16-sdpa (last; adds ~4 min)
  --dry-run      print the plan of commands and exit 0 (no CUDA needed; used by CPU CI)
  -h, --help     this text

environment: PYTHON (default python3), GPU_CHECK_SITE (default /tmp/site), GPU_CHECK_ALLOW_CPU=1 (a CPU
rehearsal without CUDA: every DeepSpeed JSON becomes ds_configs/cpu_zero3.json, gloo instead of NCCL,
flash and offload SKIP; it shakes out path and argument errors and proves nothing about a GPU).
exit: 0 all PASS/SKIP, 1 a FAIL, 2 bad arguments, 3 no CUDA (refused).
EOF
}

die_usage() { echo "gpu_check.sh: $1 (see --help)" >&2; exit 2; }

OUT=gpu_check_out
WORK=
WHEELS=.whl
OFFLOAD=0
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out|--work|--wheels)
      [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || die_usage "$1 needs a folder"
      case "$1" in --out) OUT=$2 ;; --work) WORK=$2 ;; --wheels) WHEELS=$2 ;; esac
      shift 2 ;;
    --out=*) OUT=${1#*=}; shift ;;
    --work=*) WORK=${1#*=}; shift ;;
    --wheels=*) WHEELS=${1#*=}; shift ;;
    --offload) OFFLOAD=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die_usage "unknown argument '$1'" ;;
  esac
done

ORIG=$PWD
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$ORIG/$1" ;; esac; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(abspath "$OUT")
case "$WHEELS" in /*) ;; *) [ -d "$ORIG/$WHEELS" ] && WHEELS="$ORIG/$WHEELS" || WHEELS="$REPO/$WHEELS" ;; esac
cd "$REPO" || exit 1
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
HELPERS="$REPO/scripts/gpu_check_helpers.py"
REHEARSAL=0

# ---------------------------------------------------------------- CUDA or refusal
if [ "$DRY" = 0 ]; then
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    if [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
      REHEARSAL=1
    else
      echo "gpu_check.sh: refused: no CUDA device here (torch.cuda.is_available() is not True for $PY)." >&2
      echo "  This check runs on the lent GPU machine (docs/training.md, 'First GPU run'); use --dry-run to" >&2
      echo "  see its plan, or GPU_CHECK_ALLOW_CPU=1 for a CPU rehearsal of its commands." >&2
      exit 3
    fi
  fi
fi
if [ -z "$WORK" ]; then
  if [ "$DRY" = 1 ]; then WORK=/tmp/gpu_check.XXXXXX; else WORK=$(mktemp -d /tmp/gpu_check.XXXXXX); fi
else
  WORK=$(abspath "$WORK")
fi

# ---------------------------------------------------------------- the plan
# name|ds_config|attn|first steps (empty: no resume)|export|embed|more overrides (space-separated)
CONFIGS=(
  "zero3-bf16-sdpa|ds_configs/zero3_bf16.json|sdpa|6|1|1|"
  "zero2-bf16-sdpa|ds_configs/zero2_bf16.json|sdpa|6|1|1|"
  "zero3-bf16-lora|ds_configs/zero3_bf16.json|sdpa|6|1|1|model.llm.lora.enabled=true model.llm.lora.dropout=0.1 train.chunk_pairs=2"
  "zero3-bf16-fa2|ds_configs/zero3_bf16.json|flash_attention_2||1|0|"
)
[ "$OFFLOAD" = 1 ] && CONFIGS+=("zero3-offload-bf16-sdpa|ds_configs/zero3_offload.json|sdpa||1|0|")
STEPS=10
TRAIN_TIMEOUT=240; OFFLOAD_TIMEOUT=360; TOOL_TIMEOUT=180  # offload: compile (~3 min) + run, inside the call's 10 min
if [ "$REHEARSAL" = 1 ]; then TRAIN_TIMEOUT=900; TOOL_TIMEOUT=600; fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"

# UNVERIFIED on a GPU: `embed --device cuda` (model and batches on cuda:LOCAL_RANK, parts every 2 batches)
# was written on a CPU machine. A FAIL here with "--device cuda: no CUDA device here" means torch saw no
# GPU; any other embed FAIL is the GPU path itself (launcher/eval/embed.py: embed_device, load_embedder).
EMBED_DEVICE=()
if "$PY" -m notellm2.launcher embed --help 2>/dev/null | grep -q -- '--device'; then EMBED_DEVICE=(--device cuda --part-every 2); fi
[ "$REHEARSAL" = 1 ] && [ ${#EMBED_DEVICE[@]} -gt 0 ] && EMBED_DEVICE=(--device cpu --part-every 2)

INPUTS="$WORK/inputs"
if [ "$DRY" = 1 ]; then
  LLM='$LLM'; CLIP='$CLIP'; TRAIN='$TRAIN_SHARDS'; NOTES='$NOTES_VAL'; NOTES_COUNT='$N'
fi

show() {  # the command, quoted as bash would need it; a glob (the wheel folder's *.whl) stays readable
  local a; printf '  +'
  for a in "$@"; do case "$a" in *'*'*) printf ' %s' "$a" ;; *) printf ' %q' "$a" ;; esac; done
  printf '\n'
}

# run LOG TIMEOUT cmd...: dry-run prints it; else appends its output to LOG under a hard timeout.
run() {
  local log=$1 limit=$2; shift 2
  if [ "$DRY" = 1 ]; then show "$@"; return 0; fi
  { printf '\n[gpu_check] %s $' "$(date -u +%H:%M:%S)"; printf ' %q' "$@"; printf '\n'; } >>"$log"
  timeout -k 15 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "[gpu_check] timed out after ${limit}s" >>"$log"
  return "$rc"
}

torchrun_cmd() { echo "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 --max-restarts 0; }

RESULTS=()
FAILED=0
result() {  # result KIND NAME [REASON]
  local line="$1 $2${3:+ ($3)}"
  RESULTS+=("$line")
  echo "$line"
  [ "$DRY" = 1 ] || echo "$line" >>"$OUT/summary.txt"
  [ "$1" = FAIL ] && FAILED=1
  return 0
}
first_error() {  # the launcher's "rank R failed at step S (phase): ...", else the first error, else torchrun's exit code
  local e
  e=$(grep -E 'failed at step' "$1" | head -n 1)
  [ -n "$e" ] || e=$(grep -E '[A-Za-z]+(Error|Exception)(:|$)' "$1" | grep -v -e '^\[gpu_check\]' -e ChildFailedError | head -n 1)
  [ -n "$e" ] || e=$(grep -E '^ *exitcode *:' "$1" | head -n 1)
  printf '%s' "$e" | sed 's/^ *//' | cut -c1-200
}
fail_tail() { [ "$DRY" = 1 ] || { echo "----- last lines of $1"; tail -n 25 "$1"; echo "-----"; }; }

# ---------------------------------------------------------------- setup
T0=$(date +%s)
if [ "$DRY" = 1 ]; then
  echo "gpu_check plan (dry run; work dir $WORK, logs to $OUT):"
  echo "setup:"
else
  mkdir -p "$OUT" "$WORK" || exit 1
  : >"$OUT/summary.txt"
  echo "[gpu_check] logs in $OUT, work dir $WORK$([ "$REHEARSAL" = 1 ] && echo '; CPU REHEARSAL (GPU_CHECK_ALLOW_CPU=1): cpu_zero3.json for every configuration, gloo, nothing here says anything about a GPU')"
fi
SETUP_LOG="$OUT/setup.log"
setup_ok=1
need_install=1
if [ "$DRY" = 0 ] && "$PY" -c 'import sys, deepspeed, webdataset, braceexpand, transformers; sys.exit(transformers.__version__ != "5.23.0")' >/dev/null 2>&1; then
  need_install=0
  echo "[gpu_check] deepspeed, webdataset and transformers 5.23.0 import already: no install" | tee -a "$SETUP_LOG"
fi
if [ "$need_install" = 1 ]; then
  if [ "$DRY" = 0 ] && ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    result FAIL setup "no wheels in $WHEELS: run scripts/gpu_wheels.sh on the CPU machine and carry .whl"
    setup_ok=0
  else
    if [ "$DRY" = 1 ]; then wheel_files=("$WHEELS/*.whl"); else wheel_files=("$WHEELS"/*.whl); fi
    run "$SETUP_LOG" "$TOOL_TIMEOUT" "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$SITE" "${wheel_files[@]}" \
      || { result FAIL setup "pip install of $WHEELS failed: see setup.log"; setup_ok=0; }
  fi
fi
if [ "$setup_ok" = 1 ]; then
  run "$SETUP_LOG" 60 "$PY" "$HELPERS" env
  env_rc=$?
  if [ "$DRY" = 0 ]; then
    tail -n 1 "$SETUP_LOG"
    if [ "$env_rc" != 0 ] && [ "$REHEARSAL" = 0 ]; then result FAIL setup "torch sees no CUDA after the install"; setup_ok=0; fi
    if ! "$PY" -c 'import sys, deepspeed, webdataset, transformers; sys.exit(transformers.__version__ != "5.23.0")' >>"$SETUP_LOG" 2>&1; then
      result FAIL setup "deepspeed/webdataset/transformers 5.23.0 do not import after the install: see setup.log"; setup_ok=0
    fi
  fi
fi
if [ "$setup_ok" = 1 ]; then
  if run "$SETUP_LOG" "$TOOL_TIMEOUT" "$PY" "$HELPERS" inputs "$INPUTS"; then
    if [ "$DRY" = 0 ]; then
      field() { "$PY" "$HELPERS" field "$INPUTS/inputs.json" "$1"; }
      LLM=$(field llm); CLIP=$(field clip); TRAIN=$(field train_shards); NOTES=$(field notes_val)
      NOTES_COUNT=$(field notes_val_count)
    fi
  else
    result FAIL setup "building the tiny inputs failed: see setup.log"; setup_ok=0
  fi
fi
if [ "$setup_ok" = 0 ]; then fail_tail "$SETUP_LOG"; echo "[gpu_check] FAIL: setup failed, no configuration ran"; exit 1; fi
FLASH=0
if [ "$DRY" = 0 ] && [ "$REHEARSAL" = 0 ] && "$PY" -c 'import flash_attn' >/dev/null 2>&1; then FLASH=1; fi
if [ "$DRY" = 0 ] && [ ${#EMBED_DEVICE[@]} -eq 0 ]; then
  echo "[gpu_check] note: the embed verb has no --device; embedding runs on its default device (CPU)"
fi

# ---------------------------------------------------------------- configurations
for spec in "${CONFIGS[@]}"; do
  IFS='|' read -r name ds attn first do_export do_embed more <<<"$spec"
  log="$OUT/$name.log"
  run_dir="$WORK/runs/$name"
  export_dir="$WORK/exports/$name"
  emb_dir="$WORK/embeddings/$name"
  if [ "$DRY" = 1 ]; then
    echo "$name:"
    case "$name" in
      *fa2*) echo "  (only where 'import flash_attn' works; else SKIP $name)" ;;
      *offload*) echo "  (runs last, compiles DeepSpeedCPUAdam on first use)" ;;
    esac
  else
    if [[ "$name" == *fa2* ]] && [ "$FLASH" = 0 ]; then
      result SKIP "$name" "flash_attn does not import$([ "$REHEARSAL" = 1 ] && echo ': CPU rehearsal')"; continue
    fi
    if [[ "$name" == *offload* ]] && [ "$REHEARSAL" = 1 ]; then
      result SKIP "$name" "CPU rehearsal"; continue
    fi
    : >"$log"
    echo "[gpu_check] $name ($(($(date +%s) - T0)) s since start)"
  fi
  [ "$REHEARSAL" = 1 ] && ds=ds_configs/cpu_zero3.json
  limit=$TRAIN_TIMEOUT
  [[ "$name" == *offload* ]] && limit=$OFFLOAD_TIMEOUT
  overrides=("model.llm.path=$LLM" "model.vision.path=$CLIP" "data.train_shards=$TRAIN"
             "model.llm.attn_implementation=$attn" "train.ds_config=$ds" "train.precision=bf16"
             "train.output_dir=$run_dir" "checkpoint.every_steps=5" "checkpoint.keep_last=2")
  # shellcheck disable=SC2206
  [ -n "$more" ] && overrides+=($more)
  env_prefix=(env "NCCL_DEBUG=INFO" "NCCL_DEBUG_SUBSYS=INIT")
  [ "$REHEARSAL" = 1 ] && env_prefix=(env "DS_ACCELERATOR=cpu" "OMP_NUM_THREADS=2")
  # shellcheck disable=SC2207
  launch=("${env_prefix[@]}" $(torchrun_cmd) -m notellm2.launcher train --config configs/tiny_cpu.yaml)
  reason=""
  if [ -n "$first" ]; then
    run "$log" "$limit" "${launch[@]}" "${overrides[@]}" "train.max_steps=$first" || reason="train to step $first failed"
  fi
  if [ -z "$reason" ]; then
    run "$log" "$limit" "${launch[@]}" "${overrides[@]}" "train.max_steps=$STEPS" \
      || reason="$([ -n "$first" ] && echo "resume $first -> $STEPS" || echo "train $STEPS steps") failed"
  fi
  if [ -z "$reason" ]; then
    verify=("$PY" "$HELPERS" verify-run "$run_dir" --steps "$STEPS")
    [ -n "$first" ] && verify+=(--resumed-at "$first" --log "$log")
    run "$log" 60 "${verify[@]}" || reason="$( [ "$DRY" = 1 ] || grep -o 'check failed: .*' "$log" | tail -n 1 | cut -c1-160)"
  fi
  if [ -z "$reason" ] && [ "$do_export" = 1 ]; then
    run "$log" "$TOOL_TIMEOUT" "$PY" -m notellm2.launcher export --run-dir "$run_dir" --out "$export_dir" --overwrite \
      || reason="export failed"
  fi
  if [ -z "$reason" ] && [ "$do_embed" = 1 ]; then
    run "$log" "$TOOL_TIMEOUT" "$PY" -m notellm2.launcher embed --model "$export_dir" --shards "$NOTES" --out "$emb_dir" \
      --batch-size 16 "${EMBED_DEVICE[@]}" || reason="embed failed"
    if [ -z "$reason" ]; then
      run "$log" 60 "$PY" "$HELPERS" verify-embed "$emb_dir" --count "$NOTES_COUNT" \
        || reason="$( [ "$DRY" = 1 ] || grep -o 'check failed: .*' "$log" | tail -n 1 | cut -c1-160)"
    fi
  fi
  if [ "$DRY" = 1 ]; then continue; fi
  if [ -n "$reason" ]; then
    grep -q "timed out after" "$log" && reason="$reason; timed out"
    err=$(first_error "$log")
    [ -n "$err" ] && reason="$reason: $err"
    result FAIL "$name" "$reason; see $name.log"
    fail_tail "$log"
  else
    [ "$REHEARSAL" = 0 ] && ! grep -q "NCCL INFO" "$log" && echo "[gpu_check] note: $name printed no 'NCCL INFO' line"
    result PASS "$name"
  fi
done

if [ "$DRY" = 1 ]; then
  echo "then one line per configuration: PASS <config> | FAIL <config> (<reason>) | SKIP <config> (<reason>)"
  [ "$OFFLOAD" = 0 ] && echo "(--offload adds zero3-offload-bf16-sdpa, last)"
  exit 0
fi
echo "[gpu_check] done in $(($(date +%s) - T0)) s$([ "$REHEARSAL" = 1 ] && echo ' (CPU rehearsal)'): ${RESULTS[*]}"
exit "$FAILED"
