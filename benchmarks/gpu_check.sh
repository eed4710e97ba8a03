#!/usr/bin/env bash
# The GPU check, in two calls of the device tool, report under $OUT:
#
#   call 1:  bash benchmarks/gpu_check.sh build tests   build with FASTCAP_REQUIRE_CUDA=1, check that
#                                                       fastcap has CUDA and torch sees a GPU, then
#                                                       `pytest -m cuda` (the CUDA tests only), 60 s a test
#   call 2:  bash benchmarks/gpu_check.sh bench         ResNet-50 b256 fp16 channels_last layer1..4:
#                                                       full / memory growth / mean / topk, then GPT-2 bf16
#                                                       tokens and LM extract: one process and one JSON each
#
# (`bash benchmarks/gpu_check.sh` alone does all three steps; call 2 reuses call 1's in-place build
# while the machine is still warm). The device budget is 15 minutes a session, its start included,
# and 10 minutes a call. Every step runs under its own `timeout`, so a hung step costs at most its
# limit and the steps after it still run; each benchmark writes its JSON the moment it ends, so a
# timeout returns what finished. The limits (seconds, the T_* below), in the worst case:
#
#   call 1: header 15 + probe 5 + build 180 + check 20 + tests 160                          = 380
#   call 2: header 15 + probe 5 + check 20 + full 60 + growth 80 + mean 40 + topk 40
#           + tokens 60 + LM extract 60 + report 10                                         = 390
#   both calls together: 770 s <= 780 (the 15 minutes less the machine's start)
#
# With DEVICE=cpu every limit is multiplied by TIME_SCALE (default 4 there, 1 on CUDA): a 2-core
# CPU doing the GPU's work, even shrunk by QUICK=1, is far slower.
#
# Memory growth, host memory under 64 GiB: the four layers' fp16 outputs are, per image,
# 256*56*56 + 512*28*28 + 1024*14*14 + 2048*7*7 = 1,505,280 values = 3.01 MB, so 771 MB a batch of
# 256. The old checkpoints (1,10,100) kept 77 GB; 1,10,20 keep 20 x 771 MB = 15.4 GB per "kept" case
# (at most twice that, 31 GB, while fastcap's kept case joins its result), one case per process.
#
# DEVICE=cpu QUICK=1 runs the same Python paths on a machine without a GPU (how this script is
# checked there), in a fresh /tmp/gpucheck-dry.* unless OUT is set; it does not build (the in-place
# extension is used as it is) and skips the CUDA assertion.
# Then commit $OUT's files under benchmarks/results/gpu-h200-<date>/ (device, driver, torch, commit
# and date are in report.md) and put its table in README.md.
set -uo pipefail
STEPS=${*:-build tests bench}
want() { [[ " $STEPS " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then OUT=${OUT:-$(mktemp -d /tmp/gpucheck-dry.XXXXXX)}; fi
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
report="$OUT/report.md" log="$OUT/log.txt"
touch "$log"
T_HEADER=15 T_PROBE=5 T_BUILD=180 T_CHECK=20 T_TESTS=160
T_FULL=60 T_GROWTH=80 T_MEAN=40 T_TOPK=40 T_TOKENS=60 T_EXTRACT=60 T_REPORT=10
scale=${TIME_SCALE:-1}
[ "$DEVICE" = cpu ] && scale=${TIME_SCALE:-4}
for t in ${!T_*}; do printf -v "$t" %d $(( ${!t} * scale )); done
rc=0
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }
# bounded NAME LIMIT CMD...: CMD under `timeout LIMIT`, its output appended to the log; the
# outcome and its time go to the report, a failure or a timeout sets rc and the script goes on.
bounded() {
  local name=$1 limit=$2 start r
  shift 2
  start=$(date +%s)
  echo "== $name: $* (limit $limit s)" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  r=$?
  if [ $r = 0 ]; then
    echo "- $name: ok ($(( $(date +%s) - start )) s)" >> "$report"
  elif [ $r = 124 ]; then
    echo "- $name: TIMED OUT after $limit s" >> "$report"; rc=1
  else
    echo "- $name: FAILED, exit $r ($(( $(date +%s) - start )) s)" >> "$report"; rc=1
  fi
  return $r
}

# The Python snippets (heredocs: no shell quoting inside).
read -r -d '' versions <<'EOF'
import sys, torch, torch.utils.cpp_extension as c
ninja = "yes" if c.is_ninja_available() else "NO (the build is serial)"
print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Python {sys.version.split()[0]}, ninja {ninja}")
EOF
read -r -d '' check_cuda <<'EOF'
import sys, torch, fastcap
ok = fastcap.BUILT_WITH_CUDA and torch.cuda.is_available()
gpu = ", " + torch.cuda.get_device_name() if torch.cuda.is_available() else ""
print(f"- check: {'ok' if ok else 'FAILED'}: fastcap.BUILT_WITH_CUDA={fastcap.BUILT_WITH_CUDA}, "
      f"torch.cuda.is_available()={torch.cuda.is_available()}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}){gpu}")
sys.exit(0 if ok else 1)
EOF
read -r -d '' check_cpu <<'EOF'
import fastcap, torch
print(f"- check: fastcap imports, BUILT_WITH_CUDA={fastcap.BUILT_WITH_CUDA}, "
      f"torch.cuda.is_available()={torch.cuda.is_available()} (not required: DEVICE=cpu)")
EOF

if [ ! -f "$report" ]; then
  {
    echo "# fastcap GPU check"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
    echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    timeout $T_HEADER $PY -c "$versions" 2>&1 | tail -1
  } > "$report"
fi
echo "- steps: $STEPS (DEVICE=$DEVICE QUICK=${QUICK:-0})" >> "$report"

# pytest-timeout may be missing on the device: then no per-test limit (the step's `timeout`
# still bounds the whole run).
per_test=()
if timeout $T_PROBE $PY -c 'import pytest_timeout' 2> /dev/null; then per_test=(--timeout "${TEST_TIMEOUT:-60}"); fi

if want build; then
  step "build"
  if [ "$DEVICE" = cpu ]; then
    echo "- build: skipped (DEVICE=cpu: the extension built in place is used as it is)" >> "$report"
  else
    from=$(( $(wc -l < "$log") + 1 ))
    if ! bounded build $T_BUILD env FASTCAP_REQUIRE_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e .; then
      tail -n +$from "$log" | tail -40; cat "$report"; exit 1
    fi
  fi
fi

# One line saying what was built and what torch sees; with CUDA, not both: stop here.
step "check"
check=$check_cuda
[ "$DEVICE" = cpu ] && check=$check_cpu
line=$(timeout $T_CHECK $PY -c "$check" 2>&1)
r=$?
{ echo "$line" | grep -m1 '^- check' || echo "- check: FAILED: $(echo "$line" | tail -1)"; } >> "$report"
if [ $r != 0 ]; then
  echo "$line"; echo "- check: exit $r, nothing else run" >> "$report"; cat "$report"; exit 1
fi

if want tests; then
  step "tests: pytest -m cuda ${per_test[*]}"
  from=$(( $(wc -l < "$log") + 1 ))
  bounded "tests (pytest -m cuda ${per_test[*]})" $T_TESTS \
      $PY -m pytest tests -m cuda -q -rs -p no:cacheprovider "${per_test[@]}"
  echo "  $(tail -1 "$log")" >> "$report"
  tail -n +$from "$log" | grep -E "^(FAILED|ERROR)" | head -30 >> "$report"
  tail -n +$from "$log" | grep -E "^SKIPPED" | head -10 >> "$report"
fi

if want bench; then
  from=$(( $(wc -l < "$log") + 1 ))
  if [ "${QUICK:-0}" = 1 ]; then
    size=(--batch-size 4 --image-size 64 --rounds 1 --batches 1); memory=1,2
    export FASTCAP_BENCH_QUICK=1
  else
    size=(--batch-size 256 --image-size 224 --rounds 5 --batches 5); memory=1,10,20  # see the header
  fi
  dtype=(--dtype float16 --channels-last)
  [ "$DEVICE" = cpu ] && dtype=()
  resnet=(-m fastcap bench --model torchvision:resnet50 --layers layer1 layer2 layer3 layer4 --k 8
          "${size[@]}" "${dtype[@]}" --device "$DEVICE")
  step "benchmark: ResNet-50 full, throughput"
  bounded "bench full" $T_FULL $PY "${resnet[@]}" --reduce full \
      --methods none,clone,nonblocking,fastcap --no-memory-growth --out "$OUT/resnet50-full"
  step "benchmark: ResNet-50 full, memory growth after $memory batches (one process per case)"
  bounded "bench memory growth" $T_GROWTH $PY "${resnet[@]}" --reduce full \
      --methods none,clone,nonblocking,fastcap --rounds 1 --batches 1 --memory-batches "$memory" \
      --out "$OUT/resnet50-growth"
  step "benchmark: ResNet-50 mean"
  bounded "bench mean" $T_MEAN $PY "${resnet[@]}" --reduce mean \
      --methods none,clone,torch_reduce,fastcap --no-memory-growth --out "$OUT/resnet50-mean"
  step "benchmark: ResNet-50 topk"
  bounded "bench topk" $T_TOPK $PY "${resnet[@]}" --reduce topk \
      --methods none,clone,torch_reduce,fastcap --no-memory-growth --out "$OUT/resnet50-topk"
  # pytest-benchmark writes its JSON when the session ends, and not at all when a test was cut
  # short by pytest-timeout: one session per benchmark, bounded from outside only.
  step "benchmark: GPT-2, two residual layers as tokens"
  bounded "bench tokens" $T_TOKENS $PY -m pytest benchmarks/test_bench_tokens.py -q -s \
      -p no:cacheprovider -k "$DEVICE" --benchmark-json="$OUT/tokens.json"
  step "benchmark: extract of hf-random:gpt2?n_layer=8 with early exit"
  bounded "bench LM extract" $T_EXTRACT $PY -m pytest benchmarks/test_bench_extract_lm.py -q -s \
      -p no:cacheprovider -k "$DEVICE" --benchmark-json="$OUT/extract_lm.json"
  # The device tool brings back at most 8 files: report.md, log.txt and the six JSONs; the plots
  # can be drawn again from the JSONs (fastcap.bench.plot).
  rm -f "$OUT"/resnet50-*.png
  {
    echo
    timeout $T_REPORT $PY benchmarks/gpu_report.py "$OUT"
    echo; echo '```'; tail -n +$from "$log" | grep -vE "^\[|it/s|%\|" | tail -80; echo '```'
  } >> "$report"
fi

step "report"
cat "$report"
echo "($(ls "$OUT" | wc -l) files in $OUT)"
exit $rc
