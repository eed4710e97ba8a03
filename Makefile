# fastcap's two commands, each doing all set-up on a fresh machine:
#   make demo   extract features of a synthetic dataset with resnet50 (the main job)
#   make demo-lm  the same for a language model: a random GPT-2 over packed synthetic text
#   make test   venv + dependencies + build (CUDA sources too, when nvcc is here) + all tests
# and: make bench (CPU benchmarks), make build, make clean.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

# Build settings that worked here: torch guesses CUDA_HOME=/usr/local without a GPU,
# 2 cores, and one arch (the H100's) keeps the CUDA compile short.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
export MAX_JOBS ?= 2
export TORCH_CUDA_ARCH_LIST ?= 9.0

SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h')

.PHONY: test demo demo-lm bench build cmake-test pytest clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	@echo "building fastcap._C (CUDA_HOME=$${CUDA_HOME:-none}, arch $$TORCH_CUDA_ARCH_LIST)"
	time $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

# The C++ ring tests, through CMake and ctest (the CPU build: setup.py already compiles
# the CUDA sources; pass CMAKE_ARGS=-DFASTCAP_WITH_CUDA=ON to compile them here too).
cmake-test: $(VENV)/.deps
	PATH=$(abspath $(VENV))/bin:$$PATH cmake -S . -B build-cmake -G Ninja \
	  -DCMAKE_PREFIX_PATH=$$($(PY) -c 'import torch;print(torch.utils.cmake_prefix_path)') \
	  -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  -DCUDA_TOOLKIT_ROOT_DIR=$${CUDA_HOME:-/usr/local/cuda} \
	  -DCUDA_nvrtc_LIBRARY=$$($(PY) -c "import glob,sysconfig;print((glob.glob(sysconfig.get_paths()['purelib']+'/nvidia/cu*/lib/libnvrtc.so*') or [''])[0])") \
	  $(CMAKE_ARGS) > build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	PATH=$(abspath $(VENV))/bin:$$PATH cmake --build build-cmake -j2
	PATH=$(abspath $(VENV))/bin:$$PATH ctest --test-dir build-cmake --output-on-failure

pytest: $(VENV)/.built
	$(PY) -m pytest tests -q

test: $(VENV)/.built cmake-test pytest

demo: $(VENV)/.built
	$(PY) -m fastcap extract --model resnet50 --data fake:2048 --image-size 64 \
	  --layers layer1,layer2,layer3,layer4 --reduce mean --batch-size 64 --out feats/ --overwrite --progress
	@echo
	@echo "features written to feats/; open them with:"
	@echo "  import fastcap; store = fastcap.open('feats/'); print(store['layer4'].shape)"

# A 4-block GPT-2 with random weights (nothing is downloaded) over 128 synthetic documents packed
# into rows of 128 tokens: the residual stream of two blocks at every token but BOS, then the
# masked mean of the last one per row (a second, resumable run of its own).
DEMO_LM := --model 'hf-random:gpt2?n_layer=4&n_embd=256&n_head=4' --data fake-text:128 --context 128 \
  --pack --tokens --skip-ids bos --batch-size 16 --overwrite --progress
demo-lm: $(VENV)/.built
	$(PY) -m fastcap extract $(DEMO_LM) --layers transformer.h.1,transformer.h.3,pooled=transformer.h.3 \
	  --reduce tokens,pooled=mean --out acts-lm/
	@echo
	@echo "activations written to acts-lm/; open them with:"
	@echo "  import fastcap; store = fastcap.open('acts-lm/')"
	@echo "  rows = store['transformer.h.3'][:]      # [n_tokens, 256], one row per kept token"
	@echo "  store.tokens.sample, store.tokens.position, store.tokens.token_id   # where each row came from"
	@echo "  pooled = store['pooled'][:]             # [rows, 256], masked mean of transformer.h.3"
	@echo "  store.stats['transformer.h.3'].mean     # running statistics, for normalising"

BENCH_DATE := $(shell date -u +%Y%m%d)
bench: $(VENV)/.built
	$(PY) -m pytest benchmarks -q --benchmark-json=benchmarks/results/cpu-$(BENCH_DATE).json
	$(PY) benchmarks/summarize.py benchmarks/results/cpu-$(BENCH_DATE).json
	$(PY) benchmarks/profile_hooks.py --out benchmarks/results/cpu-$(BENCH_DATE)-hooks.md
	$(PY) benchmarks/bench_loader.py --out benchmarks/results/cpu-$(BENCH_DATE)-loader

clean:
	rm -rf build build-cmake build-cmake.log *.egg-info fastcap/_C*.so $(VENV)/.built
