# Two commands on a fresh machine:
#   make demo   - install lorafmt (no torch) and run it on the built-in example LoRA
#   make test   - install the pinned dev set-up (torch CPU, diffusers, peft, lycoris-lora) and run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEMO_OUT ?= demo-out

.PHONY: demo test test-all bench install dev clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e . --config-settings editable_mode=compat
	touch $@

$(VENV)/.dev: $(VENV)/.base requirements-dev.txt
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements-dev.txt
	$(PIP) install -e ".[dev]" --config-settings editable_mode=compat
	touch $@

install: $(VENV)/.base
dev: $(VENV)/.dev

demo: $(VENV)/.base
	rm -rf $(DEMO_OUT) && mkdir -p $(DEMO_OUT)
	$(VENV)/bin/lorafmt inspect fixtures/demo/sdxl_kohya_demo.safetensors
	$(VENV)/bin/lorafmt convert fixtures/demo/sdxl_kohya_demo.safetensors --to diffusers -o $(DEMO_OUT)/pytorch_lora_weights.safetensors
	$(VENV)/bin/lorafmt convert $(DEMO_OUT)/pytorch_lora_weights.safetensors --to kohya -o $(DEMO_OUT)/for_comfyui.safetensors
	$(VENV)/bin/lorafmt convert fixtures/demo/sdxl_kohya_demo.safetensors --to peft -o $(DEMO_OUT)/peft
	$(VENV)/bin/lorafmt diff fixtures/demo/sdxl_kohya_demo.safetensors $(DEMO_OUT)/for_comfyui.safetensors
	$(VENV)/bin/lorafmt diff fixtures/demo/sdxl_kohya_demo.safetensors $(DEMO_OUT)/peft
	$(VENV)/bin/lorafmt inspect $(DEMO_OUT)/peft --json

test: $(VENV)/.dev
	$(PY) -m pytest -n 2 -q

test-all: $(VENV)/.dev
	$(PY) -m pytest -n 2 -q -m "slow or not slow"

bench: $(VENV)/.dev
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
