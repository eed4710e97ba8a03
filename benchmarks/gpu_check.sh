#!/usr/bin/env bash
# The CUDA check, in one call of the device tool on a GPU machine (torch preinstalled there,
# nothing downloadable): build fastcap._C, run the whole test suite with CUDA, run the GPU
# benchmarks, and write a report under $OUT (default benchmarks/results/gpu-<date>/).
#
#   device run:  bash benchmarks/gpu_check.sh                 (build, tests, bench)
#                bash benchmarks/gpu_check.sh build tests     (or split across calls: the
#                bash benchmarks/gpu_check.sh build bench      device tool's 10-minute limit)
#   then commit $OUT's files under benchmarks/results/ (device, torch, CUDA, date are in them).
set -uo pipefail
STEPS=${*:-build tests bench}
want() { [[ " $STEPS " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
report="$OUT/report.md"
step() { echo; echo "== $*"; }

{
  echo "# fastcap GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  $PY -c 'import torch, sys; print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Python {sys.version.split()[0]}")'
} > "$report"

tests_rc=0
if want build; then
step "build"
start=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "- build: FAILED (see build.log)" >> "$report"; exit 1
fi
echo "- build: $(( $(date +%s) - start )) s" >> "$report"
rm -f "$OUT/build.log"
fi

if want tests; then
step "tests (CUDA cases included)"
start=$(date +%s)
$PY -m pytest tests -q -rs -p no:cacheprovider > "$OUT/tests.log" 2>&1
tests_rc=$?
echo "- tests: rc=$tests_rc, $(tail -1 "$OUT/tests.log") ($(( $(date +%s) - start )) s)" >> "$report"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20 >> "$report"
fi

if want bench; then
step "benchmark: ResNet-50, batch 256, fp16, channels_last, layer1..layer4"
for reduce in mean topk full; do
  $PY -m fastcap bench --model torchvision:resnet50 --layers layer1 layer2 layer3 layer4 \
      --reduce "$reduce" --k 8 --batch-size 256 --image-size 224 --dtype float16 --channels-last \
      --device cuda --rounds 5 --batches 5 --memory-batches 1,10,50 \
      --out "$OUT/resnet50-$reduce" >> "$OUT/bench.log" 2>&1 || echo "- bench $reduce: FAILED" >> "$report"
done
# The device tool brings back at most 8 files: keep the JSONs, one plot, the logs.
rm -f "$OUT"/resnet50-mean.png "$OUT"/resnet50-topk.png
{
  echo
  echo "## ResNet-50 (bench tables)"
  echo
  echo '```'
  grep -vE "^\[|it/s|%\|" "$OUT/bench.log" | tail -120
  echo '```'
} >> "$report"
fi

step "report"
cat "$report"
exit $tests_rc
