# Thin veneer over the project's commands, one or two lines a target. `make help` lists the targets.
PY        ?= .venv/bin/python
STRATEGY  ?= lldb
PROJECT   ?= commons-io# a target of data/projects.tsv, or the path of your own Java checkout
FOLD      ?= 0
BASE_PROJECTS ?= $(shell awk -F'\t' '$$6=="base"{print $$1}' data/projects.tsv)# all 33 (data.DEFAULT_BASE)
PROJECTS  ?= $(shell awk -F'\t' '$$6=="target"{print $$1}' data/projects.tsv)
STRATEGIES ?= custom leo lldb prefix
FOLDS     ?= 0 1 2 3
ARGS      ?=# extra train.py settings for customization, e.g. ARGS="--lr=1e-3 --patience=10"
BASE_ARGS ?=# extra train.py settings for the base; its recipe: train.py BASE_DEFAULTS (e.g. --max_steps=20000 on a GPU)
CORPUS    = data/cache/corpus
TOKENIZER = data/cache/tokenizer.json
BASE      ?= checkpoints/base# the base make train customizes: the shipped one, a make base one, or an HF/fairseq path
NEW_BASE  ?= checkpoints/base-new# where make base trains a base from scratch with the shipped base's recipe
PNAME     = $(notdir $(abspath $(or $(1),$(PROJECT))))# the project's name ($(call PNAME,P): P's)
export PYTHONPATH := $(CURDIR)

.PHONY: help setup lint test bench data base base-next train smoke experiment flops gpu-check report
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
setup:  ## create .venv/ and install the pinned runtime and test dependencies
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	if command -v javac >/dev/null 2>&1; then $(MAKE) setup-java; fi
lint:  ## ruff format --check and ruff check (ruff.toml)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
test:  ## run the CPU test suite (Triton kernels run in the interpreter)
	$(PY) -m pytest tests
bench:  ## CPU benchmarks: matmul peak and MFU, model vs HF, strategies, evaluation, src2abs, serving (each prints a table)
	for b in peak model strategies evaluate abstract serve; do $(PY) bench/bench_$$b.py || exit 1; done

data:  ## fetch + mine all 38 pinned projects; PROJECT=/path/to/checkout mines your own
	$(PY) -m data.fetch $(if $(filter command line,$(origin PROJECT)),$(PROJECT))
$(CORPUS)/%.jsonl:  # one project, fetched and mined on demand (a checkout given as PROJECT is mined in place)
	$(PY) -m data.fetch $(if $(and $(wildcard $(PROJECT)/.),$(filter $*,$(PNAME))),$(PROJECT),$*)
$(TOKENIZER): $(BASE_PROJECTS:%=$(CORPUS)/%.jsonl)
	$(PY) -m data.tokenizer --projects $(BASE_PROJECTS) --out $@
$(NEW_BASE)/config.json: $(TOKENIZER)
	$(PY) train.py --mode=base "--base_projects=$(strip $(BASE_PROJECTS))" --save_base=$(NEW_BASE) $(BASE_ARGS)
base:  ## train a base from scratch with the shipped base's recipe -> checkpoints/base-new (hours on 2 cores)
base: $(NEW_BASE)/config.json
FROM      ?= checkpoints/base# the base folder make base-next goes on from
base-next: $(BASE_PROJECTS:%=$(CORPUS)/%.jsonl)  ## a next stage of the base FROM (fresh optimizer, its own schedule: train.py CONTINUE_DEFAULTS) -> NEW_BASE
	$(PY) train.py --mode=base --init_base=$(FROM) --name=base-next "--base_projects=$(strip $(BASE_PROJECTS))" --save_base=$(NEW_BASE) $(BASE_ARGS)
checkpoints/base/config.json:
	@echo "the shipped base checkpoints/base/ is missing: restore it with 'git checkout -- checkpoints/base'"; exit 1

# one run: $(1) project (a name or a checkout), $(2) strategy, $(3) fold; made as $(4), else as a run of experiment
define RUN_RULE
$(or $(4),runs/$(1)-$(2)-f$(3)/metrics.json): $(BASE)/config.json $(CORPUS)/$(call PNAME,$(1)).jsonl
	$(PY) train.py --strategy=$(2) --project=$(1) --fold=$(3) --base=$(BASE) $(ARGS)
	$(PY) evaluate.py runs/$(call PNAME,$(1))-$(2)-f$(3)
$(if $(4),,experiment: runs/$(1)-$(2)-f$(3)/metrics.json)
endef
train:  ## customize the base (STRATEGY, PROJECT, FOLD), then evaluate
$(eval $(call RUN_RULE,$(PROJECT),$(STRATEGY),$(FOLD),train))
smoke:  ## every strategy overfits one batch of the tiny preset (seconds)
	$(PY) -m pytest tests/test_train.py -k overfit
$(foreach p,$(PROJECTS),$(foreach s,$(STRATEGIES),$(foreach f,$(FOLDS),$(eval $(call RUN_RULE,$(p),$(s),$(f))))))
experiment:  ## the projects x strategies x folds matrix (make -j safe; done runs skipped)
	$(PY) evaluate.py --report runs
flops:  ## Table 1 and FLOPs per token per strategy (bart-large)
	$(PY) flops.py --model bart-large
gpu-check:  ## on a GPU: kernel checks, tuning sweep, SDPA benchmark, strategies, a bart-base base; one JSON (< 8 min)
	$(PY) tools/gpu_check.py
report:  ## Table 3/4 and Figure 3/4 analogues from every run under runs/
	$(PY) evaluate.py --report runs

.PHONY: setup-java execute
setup-java:  ## the execution harness's Java side, as root: apt installs bubblewrap, JUnit, JaCoCo, the targets' jars (skipped without javac)
	@if ! command -v javac >/dev/null 2>&1; then echo "setup-java: no javac on PATH: skipped (execute.py reports 'not run')"; \
	elif [ "$$(id -u)" != 0 ]; then echo "setup-java: needs root for apt-get: skipped; as root: apt-get install $$($(PY) execute.py --packages)"; \
	else apt-get update -q && apt-get install -y -q --no-install-recommends $$($(PY) execute.py --packages) && $(PY) execute.py --check; fi
RUN ?= runs/$(call PNAME,$(PROJECT))-$(STRATEGY)-f$(FOLD)# the run make execute tests
execute:  ## compile and run RUN's generated tests, sandboxed: execution.json, the figures into its metrics.json
	$(PY) execute.py $(RUN) --merge
