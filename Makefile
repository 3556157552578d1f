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

.PHONY: install sample-assets build-dataset test inspect publish train bench small-models clean

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
	$(PY) -m pipeline build $(MANIFEST) $(if $(OUT),--out $(OUT)) $(if $(OVERWRITE),--overwrite) $(foreach s,$(SET),--set $(s))

test: $(STAMP)
	$(PY) -m pytest -q

# Training: the default trains a tiny generated LLaVA-architecture model on out/sample (run
# `make build-dataset` first) for a few CPU steps; real manifests name hub models.
TRAIN_MANIFEST ?= $(if $(filter manifests/sample.yaml,$(MANIFEST)),manifests/train-sample.yaml,$(MANIFEST))
train: $(STAMP)
	$(PY) -m pipeline train $(TRAIN_MANIFEST) $(foreach s,$(SET),--set $(s))

# Inspect a build: rate tables in the terminal and a self-contained gallery page next to the data.
inspect: $(STAMP)
	$(PY) -m pipeline inspect $(or $(OUT),out/sample) --html $(or $(OUT),out/sample)/gallery.html

# Publish a build: `make publish REPO=user/name [PRIVATE=1] [DRY_RUN=1] [OUT=...]` uploads to the
# Hugging Face Hub (token from HF_TOKEN or `hf auth login`); `TO=s3://bucket/path` copies with fsspec.
publish: $(STAMP)
	@test -n "$(REPO)$(TO)" || { echo "make publish: give REPO=user/name (Hugging Face Hub) or TO=URL (fsspec)"; exit 2; }
	$(PY) -m pipeline publish $(or $(OUT),out/sample) $(if $(REPO),--repo $(REPO),--to $(TO)) \
		$(if $(PRIVATE),--private) $(if $(DRY_RUN),--dry-run)

# Every CPU benchmark in bench/ (parse, write, scale, judge, loss; ~6 min on 2 cores) -> bench/results/*.json
# + README.md with the machine described. On a GPU machine it also runs bench/gpu.py and bench/loss_gpu.py.
# BENCH_ARGS: e.g. --quick (smoke test), --only parse,write, --gpu no
bench: $(STAMP)
	$(PY) bench/run_all.py $(BENCH_ARGS)

# The small GroundingDINO and SAM that know only the generated shape scenes, retrained from scratch by
# the seeded recipe (both models at once, ~55 min on 2 CPU cores) -> models/shapes-*/ and bench/results/small-models.{json,md}
small-models: $(STAMP)
	$(PY) -m pipeline small-models train models

clean:
	rm -rf out $(CACHE)
