# Every target installs what it needs into .venv/ on first use: a fresh clone needs no other step.
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
MANIFEST  ?= manifests/sample.yaml
OUT       ?=
SET       ?=
CACHE     := .cache
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install sample-assets build-dataset test inspect publish train bench clean

$(STAMP):
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# Tiny random-weight models and the bundled sample inputs (both offline, idempotent).
sample-assets: $(STAMP)
	$(PY) -m pipeline tiny-models $(CACHE)/tiny-models
	$(PY) -m pipeline sample-data $(CACHE)/sample-data

build-dataset: sample-assets
	$(PY) -m pipeline build $(MANIFEST) $(if $(OUT),--out $(OUT)) $(foreach s,$(SET),--set $(s))

test: $(STAMP)
	$(PY) -m pytest -q

inspect train publish bench:
	@echo "make $@: not available yet (see the open issues)"; exit 2

clean:
	rm -rf out $(CACHE)
