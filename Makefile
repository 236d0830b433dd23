# Thin veneer over the project's commands, one or two lines a target. `make help` lists the targets.
PY        ?= .venv/bin/python
STRATEGY  ?= lldb
PROJECT   ?= commons-io# a target of data/projects.tsv, or the path of your own Java checkout
FOLD      ?= 0
BASE_PROJECTS ?= grpc-java log4j2 truth jfreechart tomcat9# the default base subset (data/__init__.py); README: all 33
PROJECTS  ?= $(shell awk -F'\t' '$$6=="target"{print $$1}' data/projects.tsv)
STRATEGIES ?= custom leo lldb prefix
FOLDS     ?= 0 1 2 3
ARGS      ?=# extra train.py settings for customization, e.g. ARGS="--lr=1e-3 --patience=10"
BASE_ARGS ?=# extra train.py settings for the base; its recipe is train.py BASE_DEFAULTS (e.g. --max_steps=20000 on a GPU)
CORPUS    = data/cache/corpus
TOKENIZER = data/cache/tokenizer.json
BASE      = checkpoints/base
PNAME     = $(notdir $(abspath $(PROJECT)))
export PYTHONPATH := $(CURDIR)

.PHONY: help setup test bench data base train smoke experiment flops gpu-check report

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup:  ## create .venv/ and install the pinned runtime and test dependencies
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt

test:  ## run the CPU test suite (Triton kernels run in the interpreter)
	$(PY) -m pytest tests

bench:  ## CPU benchmarks: model vs HF, strategies, evaluation, src2abs (each prints a table)
	for b in model strategies evaluate abstract; do $(PY) bench/bench_$$b.py || exit 1; done

data:  ## fetch + mine all 38 pinned projects; PROJECT=/path/to/checkout mines your own
	$(PY) -m data.fetch $(if $(filter command line,$(origin PROJECT)),$(PROJECT))

$(CORPUS)/%.jsonl:  # one project, fetched and mined on demand (a checkout given as PROJECT is mined in place)
	$(PY) -m data.fetch $(if $(and $(wildcard $(PROJECT)/.),$(filter $*,$(PNAME))),$(PROJECT),$*)

$(TOKENIZER): $(BASE_PROJECTS:%=$(CORPUS)/%.jsonl)
	$(PY) -m data.tokenizer --projects $(BASE_PROJECTS) --out $@

$(BASE)/config.json: $(TOKENIZER)
	$(PY) train.py --mode=base "--base_projects=$(strip $(BASE_PROJECTS))" --save_base=$(BASE) $(BASE_ARGS)

base: $(BASE)/config.json  ## train the base model (tiny preset, from scratch, on the base projects)

train: $(TOKENIZER) $(BASE)/config.json $(CORPUS)/$(PNAME).jsonl  ## customize the base (STRATEGY, PROJECT, FOLD), then evaluate
	$(PY) train.py --strategy=$(STRATEGY) --project=$(PROJECT) --fold=$(FOLD) --base=$(BASE) $(ARGS)
	$(PY) evaluate.py runs/$(PNAME)-$(STRATEGY)-f$(FOLD)

smoke:  ## every strategy overfits one batch of the tiny preset (seconds)
	$(PY) -m pytest tests/test_train.py -k overfit

define RUN_RULE
runs/$(1)-$(2)-f$(3)/metrics.json: $(TOKENIZER) $(BASE)/config.json $(CORPUS)/$(1).jsonl
	$(PY) train.py --project=$(1) --strategy=$(2) --fold=$(3) --base=$(BASE) $(ARGS)
	$(PY) evaluate.py runs/$(1)-$(2)-f$(3)
endef
$(foreach p,$(PROJECTS),$(foreach s,$(STRATEGIES),$(foreach f,$(FOLDS),$(eval $(call RUN_RULE,$(p),$(s),$(f))))))

experiment: $(foreach p,$(PROJECTS),$(foreach s,$(STRATEGIES),$(foreach f,$(FOLDS),runs/$(p)-$(s)-f$(f)/metrics.json)))  ## the projects x strategies x folds matrix (make -j safe; done runs skipped)
	$(PY) evaluate.py --report runs

flops:  ## Table 1 and FLOPs per token per strategy (bart-large)
	$(PY) flops.py --model bart-large

gpu-check:  ## on a GPU: kernel checks, tuning sweep, SDPA benchmark, strategies, a bart-base base; one JSON (< 8 min)
	$(PY) kernels/gpu_check.py

report:  ## Table 3/4 and Figure 3/4 analogues from every run under runs/
	$(PY) evaluate.py --report runs
