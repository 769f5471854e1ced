# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv demo test serve migrate clean fixtures bench chromium axe orthanc starter-encoder starter-decoded starter-encoder-colour

# The virtualenv is rebuilt whenever requirements.txt changes.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

migrate: venv
	$(PY) manage.py migrate --noinput

demo: venv migrate
	$(PY) manage.py demo_setup --url http://$(HOST):$(PORT)/
	$(PY) manage.py runserver $(HOST):$(PORT)

serve: venv
	$(PY) manage.py runserver $(HOST):$(PORT)

# The browser tests drive Debian's chromium package (never a downloaded browser).
CHROMIUM_PATH ?= /usr/bin/chromium
chromium:
	@test -x $(CHROMIUM_PATH) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "The browser tests need Debian's chromium: sudo apt-get install -y chromium" \
	         "(or set CHROMIUM_PATH to a Chromium binary)" >&2; exit 1; \
	  fi; }

# axe-core (accessibility rules) for the browser tests, from npm, pinned.
AXE_VERSION ?= 4.11.0
axe:
	@test -f .cache/axe/node_modules/axe-core/axe.min.js || \
	  npm install --prefix .cache/axe axe-core@$(AXE_VERSION) --no-audit --no-fund --silent

# The PACS tests start a real Orthanc with its DICOMweb plugin (Debian packages).
ORTHANC_PATH ?= /usr/sbin/Orthanc
orthanc:
	@test -x $(ORTHANC_PATH) -a -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null; \
	  else \
	    echo "The PACS tests need Orthanc: sudo apt-get install -y orthanc orthanc-dicomweb" \
	         "(or set ORTHANC_PATH)" >&2; exit 1; \
	  fi; }

test: venv chromium axe orthanc
	CHROMIUM_PATH=$(CHROMIUM_PATH) ORTHANC_PATH=$(ORTHANC_PATH) $(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks write JSON under bench/results/ and print tables; figures go to docs/benchmarks.md.
# Evaluation sets are arguments: point EVAL_* at a withheld split to measure on it.
SHARED ?= ../shared/data
SEEDS ?= 1
PNEUMONIA_ARGS ?= --image-size 32 --small-input no --epochs 15 --batch-size 256 --finetune-epochs 3 --distill-epochs 1 --seeds $(SEEDS) --labels-fraction 0.01,0.1,1.0
BRAIN_ARGS ?= --image-size 64 --epochs 6 --batch-size 128 --finetune-epochs 3 --distill-epochs 1 --seeds $(SEEDS) --labels-fraction 0.2,1.0
PNEUMONIA_EVAL ?= $(SHARED)/pneumoniamnist/pneumoniamnist.npz\#val
BRAIN_EVAL ?= split:0.2
NIH_EVAL ?= $(SHARED)/nih_cxr14_subset/labels.csv\#val
STARTER ?= ml_backend/starter/simclr-resnet18-64px.pt
# what the product does with no pretraining of its own: the shipped starter read at 64 and
# 128 px (MEDLABEL_EMBED_SCALES) under the refit's head, beside the pixel floor and the probe
PRODUCT_HEAD_ARGS ?= --init-checkpoint $(STARTER) --epochs 0 --embed-scales 1,2 --seeds $(SEEDS) --evaluations pixels_logreg,linear_probe,hybrid_probe,refit_head
# the product's fine-tuned network and its student (the starter, LP-FT, 10 epochs, reading at
# twice the encoder's size as `finetune` does for class networks)
PRODUCT_FINETUNE_ARGS ?= --init-checkpoint $(STARTER) --epochs 0 --seeds $(SEEDS) --finetune-epochs 10 --distill-epochs 3 --finetune-input-scale 2 --evaluations pixels_logreg,supervised,linear_probe,simclr_finetune,simclr_distill
# The shipped starter encoder (ml_backend/starter/): SimCLRv2 on every public train scan in
# $(SHARED), 175 epochs at batch 512. The shipped one took 5 min on one GPU (H200); on a
# 2-core CPU the same recipe takes about 2 h (run it in the background; resumable from
# .cache/starter/). WORKERS: DataLoader processes (14 on the GPU machine).
WORKERS ?= 2
STARTER_ARGS ?= --epochs 175 --batch-size 512 --lr 0.002 --warmup-epochs 10 --workers $(WORKERS)
starter-encoder: venv
	$(PY) -m ml_backend.ssl.starter --data $(SHARED) $(STARTER_ARGS)
# A GPU machine without the scans: decode them here into one hash-checked file, carry it there,
# and train with `python -m ml_backend.ssl.starter --decoded FILE --device cuda $(STARTER_ARGS)`.
STARTER_DECODED ?= .cache/starter/decoded-grey-64.npz
starter-decoded: venv
	$(PY) -m ml_backend.ssl.starter --data $(SHARED) --save-decoded $(STARTER_DECODED)
# The colour starter (colour projects): RGB, on bloodmnist_pbc/ and lc25000_lung/ (about 40 min
# on an idle 2-core CPU; the shipped one took 107 min beside other work).
STARTER_COLOUR_ARGS ?= --epochs 30 --workers 2
starter-encoder-colour: venv
	$(PY) -m ml_backend.ssl.starter --colour --data $(SHARED) $(STARTER_COLOUR_ARGS)

bench: venv chromium
	mkdir -p bench/results
	$(PY) -m bench.label_latency --answers 40 --out bench/results/label_latency.json
	$(PY) -m bench.webhook_latency --annotations 30 --out bench/results/webhook_latency.json
	$(PY) -m bench.throughput --sizes 28:small,32,64,128 --out bench/results/throughput.json
	$(PY) -m bench.ssl_eval --train $(SHARED)/pneumoniamnist/pneumoniamnist.npz\#train --eval $(PNEUMONIA_EVAL) $(PNEUMONIA_ARGS) --out bench/results/ssl_pneumoniamnist.json
	$(PY) -m bench.ssl_eval --train $(SHARED)/brain_mri/Training --eval $(BRAIN_EVAL) $(BRAIN_ARGS) --out bench/results/ssl_brain_mri.json
	$(PY) -m bench.ssl_eval --train $(SHARED)/pneumoniamnist/pneumoniamnist.npz\#train --eval $(PNEUMONIA_EVAL) $(PRODUCT_HEAD_ARGS) --labels-fraction 0.01,0.1,1.0 --out bench/results/product_head_pneumoniamnist.json
	$(PY) -m bench.ssl_eval --train $(SHARED)/brain_mri/Training --eval $(BRAIN_EVAL) $(PRODUCT_HEAD_ARGS) --labels-fraction 0.2,1.0 --out bench/results/product_head_brain_mri.json
	$(PY) -m bench.ssl_eval --train $(SHARED)/pneumoniamnist/pneumoniamnist.npz\#train --eval $(PNEUMONIA_EVAL) $(PRODUCT_FINETUNE_ARGS) --labels-fraction 0.01,0.1 --out bench/results/product_finetune_pneumoniamnist.json
	$(PY) -m bench.ssl_eval --train $(SHARED)/brain_mri/Training --eval $(BRAIN_EVAL) $(PRODUCT_FINETUNE_ARGS) --labels-fraction 0.2,1.0 --out bench/results/product_finetune_brain_mri.json
	$(PY) -m bench.new_class --train $(SHARED)/brain_mri/Training --eval $(BRAIN_EVAL) --init-checkpoint $(STARTER) --epochs 0 --embed-scales 1,2 --seeds $(SEEDS) --new-labels 20 --heads product,product+auto,balance:1 --out bench/results/new_class_brain_mri_product.json
	$(PY) -m bench.ssl_eval --train $(SHARED)/nih_cxr14_subset/labels.csv\#train --eval $(NIH_EVAL) --init-checkpoint $(STARTER) --epochs 0 --labels-fraction 0.2,1.0 --seeds $(SEEDS) --finetune-epochs 10 --distill-epochs 3 --out bench/results/findings_nih.json
	$(PY) -m bench.new_class --train $(SHARED)/brain_mri/Training --eval $(BRAIN_EVAL) $(BRAIN_ARGS) --seeds 5 --new-labels 10,20 --out bench/results/new_class_brain_mri.json
	$(PY) -m bench.al_sim --train $(SHARED)/pneumoniamnist/pneumoniamnist.npz\#train --eval $(PNEUMONIA_EVAL) --strategies random,entropy,margin,hybrid --start 20 --step 10 --budget 200 --seeds 5 --image-size 32 --small-input no --epochs 15 --batch-size 256 --out bench/results/al_sim_pneumoniamnist.json --plot bench/results/al_sim_pneumoniamnist.png
	$(PY) -m bench.refit_latency --source $(SHARED)/pneumoniamnist/pneumoniamnist.npz\#train --eval-source $(PNEUMONIA_EVAL) --labels 20,50,100 --repeats 3 --out bench/results/refit_latency.json

fixtures: venv
	$(PY) fixtures/make_fixtures.py

clean:
	rm -rf var/ .pytest_cache
