# The two commands of the README:
#   make serve   install the service (no torch) and serve the embedded default model on :8000
#   make test    install everything the tests need (apt and pip) and run the whole suite
PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: serve test lint lock system-deps train-default export-default bench bench-peers

# Every install of the service's own dependencies but the peers' takes constraints.txt's versions,
# those the images install, so that the tests and benchmarks run what ships.
PINNED := -c constraints.txt

$(BIN)/vit-serve: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(PINNED) -e '.[cpu]'
	touch $@

serve: $(BIN)/vit-serve
	$(BIN)/vit-serve --host $(HOST) --port $(PORT)

# torchvision imports only beside torch 2.14.1 (both are wheels on this kind of machine's disk);
# timm and torchvision are the reference libraries the checkpoint importers are proven against.
$(VENV)/.test-deps: pyproject.toml constraints.txt $(BIN)/vit-serve
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet $(PINNED) -e '.[cpu,export,test]'
	touch $@

# Re-resolve constraints.txt: the newest versions within pyproject.toml's ranges (docker/lock.py).
lock: $(BIN)/vit-serve
	$(BIN)/python docker/lock.py

# Debian packages the tests use: the labelled images, a browser for the demo page, a gateway.
system-deps:
	@test -d $(FASHION_MNIST) && command -v chromium >/dev/null && command -v nginx >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist chromium nginx; }

# What the custom resources in docker/k8s are validated against (tests/deploy): KEDA's CRDs as the pydantic
# models cloudcoil generates from them, and KServe's API as its SDK's generated models; neither project
# publishes its CRD files to PyPI, npm or Debian. Outside the venv and without dependencies: kserve's own
# (a model server's) would pin protobuf below the one onnx brings.
CRD_MODELS := $(VENV)/crd-models

$(CRD_MODELS)/.installed: Makefile $(BIN)/vit-serve
	rm -rf $(CRD_MODELS)
	$(BIN)/pip install --quiet --no-deps --target $(CRD_MODELS) \
		cloudcoil==0.6.0 cloudcoil-models-keda==2.16.1.0 kserve==0.21.0 six==1.17.0
	touch $@

test: $(VENV)/.test-deps $(CRD_MODELS)/.installed system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(VENV)/.test-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Run by hand, not in CI: retrain the embedded model (about 70 minutes on 2 cores), then export it.
# Two phases, as recorded in model_export/default_model/training_record.json: 30 epochs from
# scratch, then 12 more from those weights on a lower learning-rate schedule.
train-default: $(VENV)/.test-deps system-deps
	$(BIN)/python -m model_export.train_fashion_mnist --out build/phase1
	$(BIN)/python -m model_export.train_fashion_mnist --init-from build/phase1 --out model_export/default_model \
		--epochs 12 --lr 4e-4 --warmup-epochs 1 --seed 1

# Fused attention: the embedded model is small enough that per-operator overhead counts (README).
export-default: $(VENV)/.test-deps
	$(BIN)/vit-export model_export/default_model --out service/default_model --name fashion-mnist-vit --fused-attention

# Run by hand, not in CI: export ViT-Ti/16 and ViT-B/16 (fp32 and int8) and bench each against the
# raw onnxruntime limit and a FastAPI + PyTorch baseline; JSON, plots and summary.md in $(BENCH_OUT).
# Its own venv with the CPU-only torch wheel: the test venv's torch is the 5 GB CUDA build.
BENCH_VENV ?= .venv-bench
BENCH_OUT ?= bench-results

$(BENCH_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet torch==2.13.0
	$(BENCH_VENV)/bin/pip install --quiet $(PINNED) -e '.[cpu,bench]'
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/vit-bench reproduce --out $(BENCH_OUT)

# Run by hand, not in CI: the service beside LitServe, BentoML, Ray Serve, PyTriton (Triton), mosec
# and TorchServe (Java: Debian's JRE) serving the same graph with the same decode; JSON, Markdown,
# plot and logs in $(PEERS_OUT). One venv holds all six at these pins (pip check is clean); PyTriton
# needs numpy < 2, so every server there runs numpy 1.26. PEERS_EXTRA=gpu installs onnxruntime-gpu
# instead (then PEERS_ARGS='--device cuda --model DIR').
PEERS_VENV ?= .venv-peers
PEERS_OUT ?= bench-results/peers
PEERS_EXTRA ?= cpu
PEERS_ARGS ?=
PEERS_PINS := litserve==0.2.19 bentoml==1.4.40 'ray[serve]==2.60.0' mosec==0.9.8 nvidia-pytriton==0.7.0 \
	torchserve==0.12.0 torch-model-archiver==0.12.0

$(PEERS_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet torch==2.13.0
	$(PEERS_VENV)/bin/pip install --quiet -e '.[$(PEERS_EXTRA),bench]' $(PEERS_PINS)
	$(PEERS_VENV)/bin/pip check
	touch $@

bench-peers: $(PEERS_VENV)/.installed
	@test -d $(FASHION_MNIST) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }
	@command -v java >/dev/null || { apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless; }
	$(PEERS_VENV)/bin/vit-bench peers --out $(PEERS_OUT) $(PEERS_ARGS)
