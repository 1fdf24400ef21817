# Every target installs what it needs (scripts/install.sh is idempotent and fast when done).
PY      := .venv/bin/python
MODEL   ?=
PORT    ?= 8000
POLICY  ?= none
VLLM_ARGS ?=

.PHONY: install serve test test-fast eval eval-ruler bench clean

install:
	bash scripts/install.sh

serve: install
	$(PY) -m vllm_entropy_kv.launch --port $(PORT) --policy $(POLICY) \
		$(if $(MODEL),--model $(MODEL)) -- $(VLLM_ARGS)

test: install
	$(PY) -m pytest -v -ra --durations=15

test-fast: install
	$(PY) -m pytest -v -m "not server and not model"

eval: install
	$(PY) -m vllm_entropy_kv.eval

# The RULER-style suite (docs/RESULTS.md, section "RULER-style suite"): the full grid by
# default; RULER_ARGS="--lengths 2048 --samples 20 --resume" or any flag of
# `python -m vllm_entropy_kv.eval.ruler --help`; MODEL=DIR for another HF model directory.
RULER_ARGS ?=
eval-ruler: install
	$(PY) -m vllm_entropy_kv.eval.ruler $(if $(MODEL),--model $(MODEL)) $(RULER_ARGS)

# The serving benchmark (starts its servers; docs/BENCHMARKS.md). BENCH_ARGS=--quick for a
# small grid, or any flag of `python -m vllm_entropy_kv.bench --help`.
BENCH_ARGS ?=
bench: install
	$(PY) -m vllm_entropy_kv.bench $(BENCH_ARGS)

clean:
	rm -rf .venv build *.egg-info .pytest_cache

# Load tests (loadtests/run.py): locust, headless, against a server started here (POLICY=,
# VLLM_ARGS=) or URL=http://127.0.0.1:PORT; reports under reports/loadtest/. KV_BUDGETS=0.1,0.5
# sends per-request budgets (a policy server).
DURATION     ?= 60
USERS        ?= 4
PROFILE      ?= short
SOAK_MINUTES ?= 5
URL          ?=
KV_BUDGETS   ?=
LOADTEST_ARGS = --users $(USERS) --profile $(PROFILE) --policy $(POLICY) \
	$(if $(KV_BUDGETS),--kv-budgets $(KV_BUDGETS)) \
	$(if $(URL),--url $(URL),-- $(VLLM_ARGS))

.PHONY: loadtest soak loadtest-compare

loadtest: install
	$(PY) loadtests/run.py --duration $(DURATION) $(LOADTEST_ARGS)

# Then checks: still healthy, vllm:kv_cache_usage_perc back to 0, RSS growth bounded.
soak: install
	$(PY) loadtests/run.py --soak-minutes $(SOAK_MINUTES) $(LOADTEST_ARGS)

# The same load against `none` and a policy in the same KV memory, one server at a time; writes
# the table into docs/BENCHMARKS.md. Flags: COMPARE_ARGS="--users 8 --duration 300" (see --help).
COMPARE_ARGS ?=
loadtest-compare: install
	$(PY) loadtests/compare.py $(COMPARE_ARGS)
