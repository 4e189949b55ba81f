# horovod_mlstm: `make train` and `make test` work as the first command on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.setup-done
NP ?= 2
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: help setup test test-fast train lint bench capacity bench-docs large-batch docker-build docker-run docker-base docker-test wheelhouse \
	clean cluster-test pretrain-imdb imdb-model-size

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: $(SETUP_STAMP) ## Install Open MPI, the .venv and Horovod 0.28.1, build the fused CPU kernels (idempotent)
	$(PY) -m horovod_mlstm.kernels

$(SETUP_STAMP): scripts/setup.sh requirements.txt pyproject.toml
	bash scripts/setup.sh
	touch $@

test: setup ## Run the whole test suite, every tier (CPU, real horovodrun -np 2 runs included)
	$(PY) -m pytest -q tests

test-fast: setup ## Run the unit tier, in the pytest process (minutes): what to run on every change
	$(PY) -m pytest -q -m unit tests

N ?= 16
cluster-test: setup ## N hosts (default 16) in network namespaces with sshd: launchers, MPI, Gloo, elastic losing a host; times and memory
	CLUSTER_HOSTS=$(N) $(PY) -m pytest -q -s tests/test_cluster.py

train: setup ## Train the CPU demo model on the built-in corpus with 2 Horovod processes
	bash launch/horovodrun.sh --gloo --np $(NP) --flagfile=configs/cpu_demo.cfg $(ARGS)

lint: setup ## Shellcheck the scripts, hadolint the Dockerfile, byte-compile the package
	$(VENV)/bin/shellcheck -x -P SCRIPTDIR launch/*.sh launch/slurm.sbatch hostfiles/discover_hosts.sh scripts/*.sh .ci/run
	$(VENV)/bin/hadolint Dockerfile
	$(PY) -m compileall -q horovod_mlstm tests train.py

BENCH_OUT ?= bench_out
bench: setup ## Throughput benchmark: machine limit, this project vs plain Keras, scaling, input (docs/PERFORMANCE.md)
	$(PY) -m horovod_mlstm.bench --output $(BENCH_OUT)/bench.json $(ARGS)

capacity: setup ## The paper's per-rank shape: memory, allreduce bytes, checkpoint size (docs/CAPACITY.md)
	$(PY) -m horovod_mlstm.bench --paper --paper_micro_batches=4 --paper_fit_streams= --output $(BENCH_OUT)/paper.json $(ARGS)

bench-docs: setup ## docs/benchmarks.md from docs/benchmarks/*.json (publish a run: make bench BENCH_OUT=docs/benchmarks)
	$(PY) -m horovod_mlstm.bench.report $(sort $(wildcard docs/benchmarks/*.json)) --output docs/benchmarks.md

SST := ../shared/data/sst
large-batch: setup ## The large-batch experiment of docs/LARGE_BATCH.md: SST from ../shared if present, else the built-in corpus
	@if [ -d $(SST) ]; then \
	  [ -f data/sst/manifest.json ] || $(PY) -m horovod_mlstm.preprocess --input $(SST)/train.csv $(SST)/dev.csv \
	    $(SST)/test.csv --format csv --csv_column sentence --output_dir data/sst --num_shards 2 \
	    --val_fraction 0.05 --test_fraction 0.05 && \
	  $(PY) -m horovod_mlstm.experiments.large_batch --data_dir data/sst --out_dir runs/large_batch_sst $(ARGS); \
	else \
	  echo "[large-batch] $(SST) is absent: using the built-in corpus"; \
	  $(PY) -m horovod_mlstm.experiments.large_batch --out_dir runs/large_batch $(ARGS); \
	fi

IMDB := ../shared/data/imdb
data/imdb/manifest.json:  # the unlabelled IMDB reviews, preprocessed (needs ../shared)
	@[ -f $(IMDB)/unsup.txt.gz ] || { echo "error: $(IMDB)/unsup.txt.gz not found: the IMDB recipe reads ../shared/data/imdb" >&2; exit 1; }
	$(PY) -m horovod_mlstm.preprocess --input $(IMDB)/unsup.txt.gz --format text --output_dir data/imdb \
	  --num_shards 16 --val_fraction 0.01 --test_fraction 0.01 --workers 2

pretrain-imdb: setup data/imdb/manifest.json ## Pretrain on 50,000 IMDB reviews (configs/cpu_imdb.cfg, 1 h budget; rerun resumes)
	bash launch/horovodrun.sh --gloo --np $(NP) --flagfile=configs/cpu_imdb.cfg $(ARGS)

imdb-model-size: setup data/imdb/manifest.json ## Validation BPC of hidden 256/512/1024 at equal characters on IMDB
	$(PY) -m horovod_mlstm.experiments.model_size --flagfile_train configs/cpu_imdb.cfg --out_dir runs/model_size $(ARGS)

DEVICE ?= gpu
DOCKER_ENV = DEVICE=$(DEVICE) $(if $(IMAGE),IMAGE=$(IMAGE)) $(if $(BASE_IMAGE),BASE_IMAGE=$(BASE_IMAGE)) NP=$(NP) \
  DOCKER_BUILD_ARGS="$(DOCKER_BUILD_ARGS)"
docker-build: ## Build the image (DEVICE=gpu|cpu; offline when wheelhouse/ is full; BASE_IMAGE= to override)
	$(DOCKER_ENV) bash scripts/docker.sh build

docker-run: ## Train the 2-process demo in the image, runs/ and data/ mounted (or: make docker-run CMD="...")
	$(DOCKER_ENV) bash scripts/docker.sh run $(CMD)

docker-base: ## Debian 12 base image horovod_mlstm-base:bookworm from debootstrap (no registry needed)
	$(if $(DEBIAN_MIRROR),DEBIAN_MIRROR=$(DEBIAN_MIRROR)) bash scripts/docker.sh base

wheelhouse: ## Download every pinned wheel and Horovod's source into wheelhouse/ (for offline image builds)
	DEVICE=$(DEVICE) bash scripts/docker.sh wheelhouse

docker-test: ## Start dockerd, build the CPU image offline on the debootstrap base, train the demo in it, check it
	bash scripts/docker.sh test

clean: ## Remove runs/, data/, caches and the built kernels (keeps .venv)
	rm -rf runs data bench_out .pytest_cache horovod_mlstm/_kernels-*.so
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
