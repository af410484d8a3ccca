# buildseg — `make demo` then `make test` on a fresh machine; `make train` then `make submit` on your data.
SHELL := /bin/bash
PY_SYS ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1

DATA   ?= data/demo
CONFIG ?= configs/default.yaml
FOLDS  ?=
GPUS   ?= 1
RESUME ?= 1
RUN    ?=
TTA    ?=
ARGS   ?=
SUBMISSION ?=
PRED   ?=
LAYOUT ?= voc

# A DATA the user typed (command line or environment) is always passed on, even when it equals the default.
DATA_ARG = $(if $(filter command line environment environment override,$(origin DATA)),--data $(DATA))

.DEFAULT_GOAL := help
.PHONY: help install demo demo-data folds train tune submit score validate check-data test test-all lint bench \
        bench-accuracy bench-models lab report predict predict-scene clean

help: ## list the targets
	@awk 'BEGIN{FS=":.*## "} /^[a-z-]+:.*## /{printf "  make %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): requirements.txt
	test -d $(VENV) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP) ## create .venv with the pinned requirements (idempotent)

demo-data: $(STAMP) ## generate the embedded demo data set in data/demo
	$(PY) -m pipeline.demo_data --out data/demo --size 256

demo: demo-data ## the whole pipeline on the demo data on CPU: folds -> train -> submit -> score
	$(PY) -m pipeline.train --config configs/demo.yaml data.root=data/demo
	$(PY) -m pipeline.submit --run runs/demo --data data/demo
	@echo "demo done: run in runs/demo (manifest.yaml, fold*/metrics.csv), submission and score in submissions/"

folds: $(STAMP) ## write DATA/folds.csv (stratified by building fraction, grouped by manifest.csv if present)
	$(PY) -m pipeline.folds --data $(DATA) $(ARGS)

check-data: $(STAMP) ## report every problem of a data folder (DATA=...)
	$(PY) -m pipeline.check_data $(DATA)

tune: $(STAMP) ## re-tune a trained run's threshold/min-area on its OOF files, no retraining (RUN= ARGS="infer.thresholds=[..]")
	$(PY) -m pipeline.tune $(if $(RUN),--run $(RUN)) $(DATA_ARG) $(ARGS)

train: $(STAMP) ## train all folds (DATA= CONFIG= FOLDS=0,1 GPUS=N RESUME=0|1 ARGS="train.epochs=3")
	$(if $(filter 1,$(GPUS)),$(PY),$(VENV)/bin/torchrun --standalone --nproc_per_node=$(GPUS)) \
	  -m pipeline.train --config $(CONFIG) $(if $(FOLDS),--folds $(FOLDS)) \
	  $(if $(filter 0,$(RESUME)),--no-resume) data.root=$(DATA) $(ARGS)

submit: $(STAMP) ## predict the test tiles with the newest run (RUN= DATA= TTA=none|flip|d4) and validate
	$(PY) -m pipeline.submit $(if $(RUN),--run $(RUN)) $(DATA_ARG) \
	  $(if $(TTA),--tta $(TTA))

validate: $(STAMP) ## check a submission file (SUBMISSION=... DATA=...)
	$(PY) -m pipeline.validate $(SUBMISSION) --sample $(DATA)/test_a_samplesubmit.csv

predict: $(STAMP) ## class-id PNGs (+ metrics.json with truth) for a run's test split, any layout (RUN= DATA= TTA=)
	$(PY) -m pipeline.predict $(if $(RUN),--run $(RUN)) $(DATA_ARG) \
	  $(if $(TTA),--tta $(TTA)) --figure 8

score: $(STAMP) ## metrics of the newest submission (SUBMISSION=) or of PNGs (PRED=dir DATA= LAYOUT=voc|cityscapes)
	$(if $(PRED),$(PY) -m pipeline.score --pred-dir $(PRED) --data $(DATA) --layout $(LAYOUT) \
	  $(if $(COLORMAP),--colormap $(COLORMAP)),$(PY) -m pipeline.score $(SUBMISSION) --truth $(DATA)/test_a_mask.csv)

predict-scene: $(STAMP) ## sliding-window prediction of a large scene (SCENE=big.tif OUT=mask.tif RUN=runs/x)
	$(PY) -m pipeline.infer scene --run $(RUN) --scene $(SCENE) --out $(OUT)

report: $(STAMP) ## write the notebooks' figures as PNG to runs/<run>/report (RUN=runs/x DATA=...)
	$(PY) -m pipeline.report $(or $(RUN),runs/demo) --data $(DATA)

lab: $(STAMP) ## open the notebooks in JupyterLab (installs jupyterlab on first use)
	$(PY) -c "import jupyterlab" 2>/dev/null || $(PY) -m pip install -q jupyterlab
	$(VENV)/bin/jupyter lab notebooks/

test: $(STAMP) ## run the test suite (CPU, a few minutes)
	$(PY) -m pytest -q

test-all: $(STAMP) ## the test suite including slow tests
	$(PY) -m pytest -q -m ""

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check pipeline tests bench

bench: $(STAMP) ## CPU benchmarks -> bench/results/*.json (RLE codec; tiny-size GPU benches)
	$(PY) -m bench.rle
	$(PY) -m bench.train_throughput --tiny
	$(PY) -m bench.infer_throughput --tiny
	$(PY) -m bench.models --tiny

bench-models: $(STAMP) ## every architecture: parameters, GPU train/infer img/s at 512 bf16 (--tiny on CPU)
	$(PY) -m bench.models $(if $(shell $(PY) -c "import torch;print(torch.cuda.is_available() or '')"),,--tiny)

bench-accuracy: $(STAMP) ## GPU: default recipe on ../shared/data/buildings-real -> bench/results/accuracy.json
	$(PY) -m bench.accuracy --data $(if $(DATA_ARG),$(DATA),../shared/data/buildings-real)

clean: ## remove runs, caches and generated demo data (keeps .venv)
	rm -rf runs data/demo .cache .pytest_cache
