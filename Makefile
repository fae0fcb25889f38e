# Two commands do all set-up on a fresh machine (see README):
#   make demo   -> venv + locked install, then the main job on the embedded default
#   make test   -> venv + locked install, then the test suite
# The lock pins torch to the local CPU wheel (found through pip's find-links folder),
# so no resolver ever pulls the multi-GB CUDA build.

PY ?= python3
VENV ?= .venv
WHEELS ?= /opt/wheels
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export GRADIO_ANALYTICS_ENABLED ?= False

.PHONY: install demo test lint lock clean bench bench-guards bench-rewrite bench-judges bench-mitigation

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml scripts/fix_torchvision.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "uv>=0.4"
	$(BIN)/uv pip install -q --python $(BIN)/python --find-links $(WHEELS) -r requirements.lock -c constraints.txt
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	$(BIN)/python scripts/fix_torchvision.py
	# Precompile once: where PYTHONDONTWRITEBYTECODE is set (as on our machines), every process
	# would otherwise recompile torch/diffusers from source (imports ~24 s -> ~10 s).
	# A few third-party files target newer Pythons (torch/testing/_internal/py312_intrinsics.py)
	# and are never imported here; their compile errors must not fail set-up.
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || \
		echo "compileall: some third-party files did not compile (never imported; fine)"
	touch $(STAMP)

demo: install
	$(BIN)/t2i-eval run

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

# Performance ratios side by side in one run (writes docs/performance.md; < 10 min here).
bench: install
	$(BIN)/python bench/performance.py
	$(BIN)/python bench/embed_cache_speed.py
	$(BIN)/python bench/text_encoder_speed.py
	$(BIN)/python bench/explorer_speed.py --records 10000 --records 100000
	$(BIN)/python bench/report_scale.py

# The mitigation lab on OVERT and CoProV2 (../shared) and the built-in suite: trained guards judged
# on sources they never saw (writes docs/mitigation.md).
bench-mitigation: install
	$(BIN)/python bench/mitigation.py

# Prompt guards on OVERT (writes docs/guards_benchmark.md) and their speed (prints a table).
bench-guards: install
	$(BIN)/python bench/guards_benchmark.py
	$(BIN)/python bench/guards_speed.py

# Rule rewriting on OVERT (writes docs/rewrite_benchmark.md).
bench-rewrite: install
	$(BIN)/python bench/rewrite_benchmark.py

# Image judges: images/s batched vs one at a time, share of run time (prints a table).
bench-judges: install
	$(BIN)/python bench/judges_speed.py

# Re-resolve the lock (needs the package registry). torch stays on the CPU wheel.
lock:
	uv pip compile pyproject.toml --extra all --python-version 3.11 --find-links $(WHEELS) \
		--index-url https://pypi.org/simple -c constraints.txt --no-header --no-annotate -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
