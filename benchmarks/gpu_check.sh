#!/usr/bin/env bash
# The GPU check, in two calls of the device tool (each under its 10-minute limit; the device's
# budget is 15 minutes a session, its start included), report under $OUT:
#
#   call 1:  bash benchmarks/gpu_check.sh build tests   build (<= 4 min) + every test with CUDA (<= 5 min)
#   call 2:  bash benchmarks/gpu_check.sh bench         ResNet-50 b256 fp16 channels_last layer1..4,
#                                                       full/mean/topk (<= 7 min) + GPT-2 bf16 tokens, LM extract (<= 2.3 min)
#
# (the machine stays warm between two calls made back to back, so call 2 reuses call 1's build;
# `bash benchmarks/gpu_check.sh` alone does all three steps). Every step has its own timeout, so
# a hung step cannot eat the budget. DEVICE=cpu QUICK=1 runs the same Python paths on a CPU
# machine in about two minutes (how this script is checked where there is no GPU).
# Then commit $OUT's files under benchmarks/results/gpu-h200-<date>/ (device, driver, torch, commit
# and date are in report.md) and put its table in README.md.
set -uo pipefail
STEPS=${*:-build tests bench}
want() { [[ " $STEPS " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
report="$OUT/report.md"
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

if [ ! -f "$report" ]; then
  {
    echo "# fastcap GPU check"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    $PY -c 'import torch, sys; print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Python {sys.version.split()[0]}")'
  } > "$report"
fi

rc=0
if want build; then
  step "build"
  start=$(date +%s)
  if ! timeout 240 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; echo "- build: FAILED (see build.log)" >> "$report"; exit 1
  fi
  echo "- build: $(( $(date +%s) - start )) s" >> "$report"
  rm -f "$OUT/build.log"
fi

if want tests; then
  step "tests (CUDA cases included)"
  start=$(date +%s)
  timeout 300 $PY -m pytest tests -q -rs -p no:cacheprovider > "$OUT/tests.log" 2>&1
  rc=$?
  echo "- tests: rc=$rc, $(tail -1 "$OUT/tests.log") ($(( $(date +%s) - start )) s)" >> "$report"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30 >> "$report"
  grep -E "^SKIPPED" "$OUT/tests.log" | head -10 >> "$report"
fi

if want bench; then
  if [ "${QUICK:-0}" = 1 ]; then
    size=(--batch-size 4 --image-size 64 --rounds 1 --batches 1); memory=1,2
    export FASTCAP_BENCH_QUICK=1
  else
    size=(--batch-size 256 --image-size 224 --rounds 5 --batches 5); memory=1,10,100
  fi
  dtype=(--dtype float16 --channels-last)
  [ "$DEVICE" = cpu ] && dtype=()
  for reduce in full mean topk; do
    step "benchmark: ResNet-50 $reduce"
    # Memory growth (fresh processes, 100 batches) only where it can grow: full.
    if [ "$reduce" = full ]; then
      extra=(--methods none,clone,nonblocking,fastcap --memory-batches "$memory")
    else
      extra=(--methods none,clone,torch_reduce,fastcap --no-memory-growth)
    fi
    timeout 150 $PY -m fastcap bench --model torchvision:resnet50 --layers layer1 layer2 layer3 layer4 \
        --reduce "$reduce" --k 8 "${size[@]}" "${dtype[@]}" --device "$DEVICE" "${extra[@]}" \
        --out "$OUT/resnet50-$reduce" >> "$OUT/bench.log" 2>&1 || { echo "- bench $reduce: FAILED or timed out" >> "$report"; rc=1; }
  done
  step "benchmark: GPT-2, two residual layers as tokens; extract of hf-random:gpt2?n_layer=8 with early exit"
  timeout 140 $PY -m pytest benchmarks/test_bench_tokens.py benchmarks/test_bench_extract_lm.py -q -s \
      -p no:cacheprovider -k "$DEVICE" \
      --benchmark-json="$OUT/tokens.json" >> "$OUT/bench.log" 2>&1 || { echo "- tokens bench: FAILED or timed out" >> "$report"; rc=1; }
  # The device tool brings back at most 8 files: the JSONs, the full-capture plot, the log, the report.
  rm -f "$OUT"/resnet50-mean.png "$OUT"/resnet50-topk.png
  { echo; $PY benchmarks/gpu_report.py "$OUT"; echo; echo '```'; grep -vE "^\[|it/s|%\|" "$OUT/bench.log" | tail -80; echo '```'; } >> "$report"
fi

step "report"
cat "$report"
exit $rc
