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
NODES  ?= 1
NODE_RANK ?= 0
MASTER ?= 127.0.0.1:29500
RESUME ?= 1
FORCE  ?= 0
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
        bench-accuracy bench-proxy bench-models bench-scale bench-footprints bench-scenes lab report predict predict-scene \
        predict-scenes footprints bench-gpu gpu-prepare \
        weights pseudo blend runs clean

help: ## list the targets
	@awk 'BEGIN{FS=":.*## "} /^[a-z-]+:.*## /{printf "  make %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): requirements.txt
	test -d $(VENV) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP) ## create .venv with the pinned requirements (idempotent)

demo-data: $(STAMP) ## generate the embedded demo data set in data/demo
	$(PY) -m pipeline.data.demo --out data/demo --size 256

demo: demo-data ## the whole pipeline on the demo data on CPU: folds -> train -> submit -> score
	$(PY) -m pipeline.train --config configs/demo.yaml data.root=data/demo
	$(PY) -m pipeline.infer.submit --run runs/demo --data data/demo
	@echo "demo done: run in runs/demo (manifest.yaml, fold*/metrics.csv), submission and score in submissions/"

folds: $(STAMP) ## write DATA/folds.csv (stratified by building fraction, grouped by manifest.csv if present)
	$(PY) -m pipeline.data.folds --data $(DATA) $(ARGS)

check-data: $(STAMP) ## report every problem of a data folder (DATA=...)
	$(PY) -m pipeline.data.check $(DATA)

# Pretrained encoder weights as a file, for a machine without internet: run it where the internet is
# reachable, copy OUT over, and train there with ARGS=model.encoder_weights=OUT.
weights: $(STAMP) ## save pretrained encoder weights to a file (ENCODER=resnet34 OUT=weights/resnet34-imagenet.pth WEIGHTS= ARCH=)
	$(PY) -m pipeline.model.weights $(if $(ENCODER),--encoder $(ENCODER)) $(if $(WEIGHTS),--weights $(WEIGHTS)) \
	  $(if $(ARCH),--arch $(ARCH)) $(if $(IN_CHANNELS),--in-channels $(IN_CHANNELS)) $(if $(OUT),--out $(OUT))

tune: $(STAMP) ## re-tune a trained run's threshold/min-area on its OOF files, no retraining (RUN= ARGS="infer.thresholds=[..]")
	$(PY) -m pipeline.train.tune $(if $(RUN),--run $(RUN)) $(DATA_ARG) $(ARGS)

# One process, or torchrun: on one machine (--standalone) or on NODES machines through torchrun's
# static rendezvous at MASTER=host:port (node 0 holds global rank 0, which writes the run folder).
# pipeline.core.launch checks the four settings first, then becomes the command.
LAUNCH = $(PY) -m pipeline.core.launch --gpus '$(GPUS)' --nodes '$(NODES)' --node-rank '$(NODE_RANK)' \
  --master '$(MASTER)' --

train: $(STAMP) ## train all folds (DATA= CONFIG= FOLDS=0,1 GPUS=N NODES=M NODE_RANK=k MASTER=host:port RESUME=0|1 FORCE=1 ARGS=)
	$(LAUNCH) -m pipeline.train --config $(CONFIG) $(if $(FOLDS),--folds $(FOLDS)) \
	  $(if $(filter 0,$(RESUME)),--no-resume) $(if $(filter 1,$(FORCE)),--force) data.root=$(DATA) $(ARGS)

# Pseudo-labelling (pipeline.infer.pseudo): the run labels the test tiles it is sure of (p <= low or >= high,
# the rest ignored), then <run>-pseudo trains on them too, validated on the run's own folds.
pseudo: $(STAMP) ## label the test tiles with a run, train <run>-pseudo on them too (RUN=runs/x FOLDS=0 DATA= ARGS="--low 0.3 --high 0.7 --tta d4 key=value")
	$(PY) -m pipeline.infer.pseudo --run $(RUN) $(if $(FOLDS),--folds $(FOLDS)) $(ARGS) $(if $(DATA_ARG),data.root=$(DATA))

submit: $(STAMP) ## predict the test tiles with the newest run (RUN= DATA= TTA=none|flip|d4|ms|d4_ms) and validate
	$(PY) -m pipeline.infer.submit $(if $(RUN),--run $(RUN)) $(DATA_ARG) \
	  $(if $(TTA),--tta $(TTA))

# Blending (pipeline.infer.blend): runs on the same folds, weights and threshold chosen on their OOF files;
# runs/<NAME> is then a run for make submit, predict-scene and report.
blend: $(STAMP) ## blend runs on their OOF predictions into runs/<NAME> (RUNS=runs/a,runs/b NAME= DATA= ARGS="--steps 5 infer.thresholds=[..]")
	$(PY) -m pipeline.infer.blend $(if $(RUNS),--runs $(RUNS)) $(if $(NAME),--name $(NAME)) $(DATA_ARG) $(ARGS)

runs: $(STAMP) ## the runs in runs/ as one table from their manifests: model, OOF Dice, threshold, submissions, age
	$(PY) -m pipeline.report.runs

validate: $(STAMP) ## check a submission (SUBMISSION=, default the newest; DATA=: its sample and tile size)
	$(PY) -m pipeline.infer.validate $(SUBMISSION) --sample $(DATA)/test_a_samplesubmit.csv

predict: $(STAMP) ## class-id PNGs (+ metrics.json with truth) for a run's test split, any layout (RUN= DATA= TTA=)
	$(PY) -m pipeline.infer.predict $(if $(RUN),--run $(RUN)) $(DATA_ARG) \
	  $(if $(TTA),--tta $(TTA)) --figure 8

score: $(STAMP) ## metrics of the newest submission (SUBMISSION=), of PNGs (PRED=dir DATA= LAYOUT=) or of FOOTPRINTS=x.gpkg TRUTH=
	$(if $(PRED),$(PY) -m pipeline.infer.score --pred-dir $(PRED) --data $(DATA) --layout $(LAYOUT) \
	  $(if $(COLORMAP),--colormap $(COLORMAP)),$(if $(FOOTPRINTS),$(PY) -m pipeline.infer.score --footprints $(FOOTPRINTS) \
	  --truth $(TRUTH),$(PY) -m pipeline.infer.score $(SUBMISSION) $(if $(DATA_ARG),--truth $(DATA)/test_a_mask.csv)))

predict-scene: $(STAMP) ## sliding-window prediction of a large scene (SCENE=big.tif OUT=mask.tif RUN=runs/x)
	$(PY) -m pipeline.infer.scenes --run $(RUN) --scene $(SCENE) --out $(OUT)

# Many scenes on every rank of a torchrun job (LAUNCH, as make train); rerun the same command to finish.
predict-scenes: $(STAMP) ## every scene of an area, resumable, one footprints file (SCENES=dir|'glob' OUT=dir RUN= GPUS= NODES= NODE_RANK= MASTER= FORCE=1 ARGS=)
	$(LAUNCH) -m pipeline.infer.area --scenes '$(SCENES)' --out $(OUT) $(if $(RUN),--run-dir $(RUN)) \
	  $(if $(filter 1,$(FORCE)),--force) $(ARGS)

footprints: $(STAMP) ## building polygons (MASK=mask.tif, or SCENE=big.tif RUN=runs/x; OUT=buildings.gpkg|.geojson|.fgb|.parquet)
	$(PY) -m pipeline.infer.footprints $(if $(MASK),--mask $(MASK),--scene $(SCENE) $(if $(RUN),--run $(RUN))) \
	  --out $(or $(OUT),buildings.gpkg) $(ARGS)

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
	$(VENV)/bin/ruff check pipeline tests bench notebooks/build_notebooks.py
	$(VENV)/bin/ruff format --check pipeline tests bench notebooks/build_notebooks.py

bench: $(STAMP) ## CPU benchmarks -> bench/results/*.json (RLE codec; tiny-size GPU benches)
	$(PY) -m bench.rle
	$(PY) -m bench.train_throughput --tiny
	$(PY) -m bench.infer_throughput --tiny
	$(PY) -m bench.models --tiny

RECIPES ?= default
bench-proxy: $(STAMP) ## CPU proxy of accuracy: recipes on the real tiles at 128 px (RECIPES="default swa" PLAIN=1 BLEND=1 SEEDS="0 1")
	$(PY) -m bench.proxy $(foreach r,$(RECIPES),--recipe $(r)) $(if $(filter 1,$(PLAIN)),--plain) \
	  $(if $(filter 1,$(BLEND)),--blend) \
	  $(if $(SEEDS),--seeds $(SEEDS))

bench-models: $(STAMP) ## every architecture: parameters, GPU train/infer img/s at 512 bf16 (--tiny on CPU)
	$(PY) -m bench.models $(if $(shell $(PY) -c "import torch;print(torch.cuda.is_available() or '')"),,--tiny)

bench-accuracy: $(STAMP) ## GPU: default recipe on ../shared/data/buildings-real -> bench/results/accuracy.json
	$(PY) -m bench.accuracy --data $(if $(DATA_ARG),$(DATA),../shared/data/buildings-real)

bench-footprints: $(STAMP) ## vectorise a generated 10,000^2 mask; none/rectangle/full on the real masks -> bench/results/footprints.json
	$(PY) -m bench.footprints

bench-scenes: $(STAMP) ## 8 scenes of real tiles: one process vs two gloo "nodes", kill + resume -> bench/results/scenes.json
	$(PY) -m bench.scenes $(ARGS)

bench-scale: $(STAMP) ## CPU stages at 1k..30k generated 512 px tiles -> bench/results/scale.json (long: ~1 h)
	$(PY) -m bench.scale $(ARGS)

# The one GPU check, sized to a 15-minute device lease (README: Scale): at most 8 minutes on one H100/H200.
gpu-prepare: ## wheels (.whl/) and real tiles (.gpu/) an offline GPU machine needs, checked against 64 MiB
	bash bench/gpu-prepare.sh $(if $(DATA_ARG),$(DATA))

bench-gpu: ## every GPU figure the README leaves to be measured -> $OUT/gpu.json (ARGS="--tiny" on CPU)
	$(if $(wildcard $(PY)),PY=$(PY)) bash bench/gpu.sh $(ARGS)

clean: ## remove runs, caches and generated demo data (keeps .venv)
	rm -rf runs data/demo .cache .pytest_cache
