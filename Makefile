# Every target installs what it needs (scripts/install.sh is idempotent and fast when done).
PY      := .venv/bin/python
MODEL   ?=
PORT    ?= 8000
POLICY  ?= none
VLLM_ARGS ?=

.PHONY: install serve test test-fast eval clean

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

clean:
	rm -rf .venv build *.egg-info .pytest_cache
