# Two entry points a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Pinned: this wheel lies on disk as a CPU build; a bare `torch` downloads a multi-GB CUDA one.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install test demo bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m rece_tool.tiny demo/models/tiny-sd15.safetensors
	test -f demo/keys/rece-signing-key.pem || $(BIN)/rece-tool keygen demo/keys
	$(BIN)/rece-tool sanitize manifests/demo.toml --overwrite
	$(BIN)/rece-tool verify demo/sanitized/tiny-sd15 --public-key demo/keys/rece-signing-key.pub.pem

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

bench-quick: $(STAMP)
	$(BIN)/python bench/run_all.py --quick

clean:
	rm -rf demo/sanitized demo/models demo/keys .pytest_cache
