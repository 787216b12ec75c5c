# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both install (once) the Debian build libraries FFCV needs, a headless Chromium for the
# dashboard test, and a virtual environment at .venv/ with the project and its dependencies.
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.installed
APT_PACKAGES := libopencv-dev libturbojpeg0-dev pkg-config chromium chromium-driver
DEMO_DATA := data/digits_train.beton data/digits_val.beton

.PHONY: setup demo test bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null || ! command -v chromium >/dev/null; then \
		echo "installing Debian packages: $(APT_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the wheels on this machine's disk, so nothing pulls another build.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -c "import tntsearch, ffcv, ray, optuna, mlflow, timm"
	touch $@

data/digits_%.beton: $(STAMP)
	$(PY) -m tntsearch.data convert digits $@ --split $*

demo: setup $(DEMO_DATA)
	$(PY) -m tntsearch.run search_spaces/demo.yaml

test: setup
	$(PY) -m pytest tests

bench: setup
	for b in $(filter-out benchmarks/common.py,$(wildcard benchmarks/*.py)); do $(PY) $$b || exit 1; done

# One prepared run of the GPU checks (needs a CUDA GPU; under 8 minutes): see docs/model_and_cost.md.
gpu-check: setup
	bash benchmarks/gpu_check.sh

clean:
	rm -rf .venv data mlflow.db mlartifacts ray_results exports
