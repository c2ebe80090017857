# Self-installing targets: the first run creates .venv, installs the CPU torch wheel in its own pip call
# (any other torch spec may pull a multi-GB CUDA build), then the package with its dev extra, every other
# dependency pinned by constraints.txt (`make lock` writes it), so a commit always installs the same stack (CI too).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt
LATEST_VENV ?= .venv-latest
SERVER_VENV ?= .venv-server
LLAMA_CPP_VERSION ?= 0.3.36
WHEELHOUSE ?= $(or $(CLARIFY_CACHE),$(HOME)/.cache/clarify_lit)/wheels

.PHONY: help install lock test test-fast test-full test-latest test-server demo reproduce clarify bench lint package-check clean

# pytest-xdist: one worker per CPU core (2 here); --dist loadfile keeps each test file in one worker, in order, so a
# module-scoped fixture (the tiny model loaded once per file) is built once, and each worker builds the session
# fixtures (the $CLARIFY_CACHE folder, the tiny model) once in its own tmp folder. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= auto
XDIST := -n $(PYTEST_WORKERS) --dist loadfile

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv: the CPU torch wheel, then the package and its dev extra pinned by constraints.txt

# Re-pin: constraints.txt = this venv's packages (pip freeze, minus the editable clarify_lit and torch, which
# TORCH_SPEC pins in its own pip call: a +cpu local version in a constraint would refuse a CUDA wheel). Run after
# changing pyproject.toml's dependencies or to move to newer releases (after `make test-latest` passes); commit it.
lock: ## rewrite constraints.txt from .venv (pip freeze; after changing dependencies)
	@test -x $(PY) || { echo "make lock: no $(VENV) yet (make install first)"; exit 1; }
	{ echo "# pip constraints of make install, written by make lock (pip freeze of the venv; torch: TORCH_SPEC in the Makefile)"; \
	  $(PIP) freeze --exclude-editable | grep -iv '^torch=='; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

# Not in CI: the newest releases of every dependency (torch stays TORCH_SPEC: another torch may be a CUDA build) in a
# separate venv, then the offline tests: does the next `make lock` hold?
test-latest: ## the offline tests against the newest releases of every dependency (.venv-latest; not in CI)
	test -x $(LATEST_VENV)/bin/python || python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST_VENV)/bin/pip freeze --exclude-editable | grep -iE '^(transformers|peft|lightning|torch)=='
	$(LATEST_VENV)/bin/python -m pytest -q -x $(XDIST) --durations=15 -m "not network and not server" tests

# offline, on a cold cache: tests marked `network` (the real QA data packages, ~88 MB from PyPI) run in test-full only
test: $(STAMP) ## the whole offline suite, on every core (CI's command)
	$(PY) -m pytest -q -x $(XDIST) --durations=15 -m "not network and not server" tests

# the edit loop: the offline suite without the tests marked `slow` (subprocess and interrupt-and-resume runs, DDP,
# packaging, the notebook: pyproject.toml's markers)
test-fast: $(STAMP) ## the offline suite without the `slow` tests (about a minute on 2 cores)
	$(PY) -m pytest -q -x $(XDIST) -m "not slow and not network and not server" tests

test-full: $(STAMP) ## make test + the `network` tests (downloads the real QA data packages)
	$(PY) -m pytest -q -x $(XDIST) --durations=15 -m "not server" tests

# Opt-in, in neither `make test` nor CI: the endpoint paths (LLM teacher, LLM judge, --policy_endpoint, a GGUF export)
# against llama.cpp's OpenAI-compatible server. scripts/server_venv.sh puts llama-cpp-python[server]==$(LLAMA_CPP_VERSION)
# into $(SERVER_VENV), building its wheel from source once (llama.cpp compiled here: minutes) and caching it in
# $(WHEELHOUSE); the embedded SmolLM2 GGUF is fetched into the cache first. tests/test_server.py starts each server
# on 127.0.0.1 at a free port and stops it even on failure. Time: README, "Against a real server".
test-server: $(STAMP) ## opt-in: teacher, judge and policy served by llama.cpp (first run builds llama-cpp-python)
	bash scripts/server_venv.sh $(SERVER_VENV) $(LLAMA_CPP_VERSION) $(WHEELHOUSE)
	CLARIFY_SERVER_GGUF=$$($(PY) -c "from clarify_lit.models import embedded_gguf; print(embedded_gguf())") \
	CLARIFY_SERVER_PYTHON=$(SERVER_VENV)/bin/python \
	$(PY) -m pytest -q -x -m server -rs --durations=5 tests/test_server.py

demo: $(STAMP) ## the main job on the embedded SmolLM2-135M-Instruct: a policy learns to ask (~13 min on 2 cores)
	$(PY) -m clarify_lit.demo --preset demo

reproduce: $(STAMP) ## the paper's protocol at CPU scale: 2 cells x 7 rows x 2 seeds, 2 stages at a time
	$(PY) -m clarify_lit.demo --preset reproduce --jobs 2 --results results

# the clarifying cell with the informative teacher and the rubric reward (docs/simulate.md; ~3x reproduce's cell)
clarify: $(STAMP) ## the clarifying cell with the informative teacher and the rubric reward
	$(PY) -m clarify_lit.demo --preset clarify --results results/clarify

# Benchmarks on the tiny model (~7 min on 2 cores shared with other jobs; one torch thread each, since extra threads
# only spin on a loaded machine); TRL is a benchmark-only extra. The SmolLM2 numbers of the README:
# $(PY) benchmarks/train_throughput.py --model embedded:smollm2-135m-instruct (see benchmarks/*.py).
bench: $(STAMP) ## rollout, training and scaling benchmarks on the tiny model
	$(PIP) install -q -e ".[bench]"
	$(PY) benchmarks/rollout_throughput.py --threads 1
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/scaling.py

# python -m build (sdist, then the wheel from it), the wheel installed in a fresh venv: clarify --help, --version and
# pip check (offline: the venv reuses this one's dependencies; tests/test_packaging.py)
package-check: $(STAMP) ## build the sdist and wheel, install the wheel in a fresh venv, run clarify
	$(PY) -m pytest -q tests/test_packaging.py

PY_DIRS = clarify_lit tests benchmarks experiments scripts

lint: $(STAMP) ## ruff check (line length 120 enforced) and ruff format --check
	$(VENV)/bin/ruff check $(PY_DIRS)
	$(VENV)/bin/ruff format --check $(PY_DIRS)

format: $(STAMP) ## ruff format the code, then ruff check --fix (imports)
	$(VENV)/bin/ruff format $(PY_DIRS)
	$(VENV)/bin/ruff check --fix $(PY_DIRS)

clean: ## remove the venvs and the pytest cache
	rm -rf $(VENV) $(LATEST_VENV) $(SERVER_VENV) .pytest_cache

help: ## list the targets
	@awk 'BEGIN {FS = ":[^#]*## "} /^[a-zA-Z_-]+:[^#]*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
