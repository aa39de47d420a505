# make demo | make test | make bench — each creates .venv when missing and installs into it once
# (a stamp file remembers; editing pyproject.toml re-installs).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.foundation-installed
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FMNIST_SYSTEM := /usr/share/datasets/fashion-mnist
DEMO_DATA := data/fashion-mnist

export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export WANDB_SILENT := true
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-all bench install fmnist-files clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps imagecorruptions  # ImageNet-C's frost photos only (its deps would add opencv-python)
	@touch $(STAMP)

# The real offline data from Debian packages when we may install them: Fashion-MNIST's IDX files (else
# `foundation data fashion-mnist` downloads them from the dataset's canonical location), openclipart and
# the Oxygen icons (downstream sets of `foundation adapt` and INTERN's amateur stage).
DEBIAN_DATA := dataset-fashion-mnist openclipart-png oxygen-icon-theme
fmnist-files:
	@missing=$$(for p in $(DEBIAN_DATA); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

$(DEMO_DATA)/manifest.json: | $(STAMP) fmnist-files
	$(VENV)/bin/foundation data fashion-mnist --out $(DEMO_DATA) --captions --overwrite

demo: $(STAMP) fmnist-files $(DEMO_DATA)/manifest.json
	OMP_NUM_THREADS=2 $(VENV)/bin/foundation train recipes/classification/resnet18_fmnist.yaml
	$(VENV)/bin/foundation eval classification --checkpoint runs/resnet18_fmnist --data $(DEMO_DATA) \
		--out runs/resnet18_fmnist/eval/classification.json
	OMP_NUM_THREADS=2 $(VENV)/bin/foundation quantize --checkpoint runs/resnet18_fmnist --data $(DEMO_DATA) \
		--val $(DEMO_DATA) --recipe recipes/quant/w8a8_rtn.yaml --val-images 2000 --onnx \
		--out runs/resnet18_fmnist/quant
	$(VENV)/bin/foundation report runs/resnet18_fmnist
	OMP_NUM_THREADS=2 $(VENV)/bin/foundation train recipes/declip/vit_tiny_fmnist.yaml
	$(VENV)/bin/foundation eval zeroshot --checkpoint runs/declip_vit_tiny_fmnist --data $(DEMO_DATA) \
		--out runs/declip_vit_tiny_fmnist/eval/zeroshot.json
	$(VENV)/bin/foundation data synthetic-humans --out data/humans --n 60 --overwrite
	$(VENV)/bin/foundation data inspect data/humans/detection --split val --samples 4 --draw runs/humans_check
	OMP_NUM_THREADS=2 $(VENV)/bin/foundation train recipes/unihcp/tiny_synthetic.yaml
	@set -e; for t in pose parsing attributes detection; do $(VENV)/bin/foundation eval unihcp_$$t \
		--checkpoint runs/unihcp_tiny_synthetic --task $$t --data data/humans/$$t \
		--out runs/unihcp_tiny_synthetic/eval/$$t.json > /dev/null; done
	$(VENV)/bin/foundation eval unihcp_reid --checkpoint runs/unihcp_tiny_synthetic --task reid \
		--data data/humans/reid/query-000000.tar::data/humans/reid/gallery-000000.tar \
		--out runs/unihcp_tiny_synthetic/eval/reid.json > /dev/null
	$(PY) -c "from foundation.data.shards import iter_raw_samples as r; \
		open('runs/unihcp_tiny_synthetic/scene.png', 'wb').write(next(r('data/humans/detection', 'val'))['png'])"
	$(VENV)/bin/foundation predict --checkpoint runs/unihcp_tiny_synthetic --image runs/unihcp_tiny_synthetic/scene.png \
		--out runs/unihcp_tiny_synthetic/predict > /dev/null
	@$(PY) -c "import json; keep = ('AP', 'OKS', 'mIoU', 'mA', 'rank1', 'mAP', 'AP50', 'JI'); \
		r = {t: json.load(open(f'runs/unihcp_tiny_synthetic/eval/{t}.json')) for t in ('pose', 'parsing', 'attributes', 'reid', 'detection')}; \
		print('UniHCP per-task metrics (60 steps: plumbing, not learning):', '; '.join(t + ' ' + ', '.join(f'{k}={v:.3f}' for k, v in m.items() if k in keep) for t, m in r.items()))"
	@echo "UniHCP here checks the plumbing only: five tasks train 60 steps on 60 synthetic people, and one checkpoint" \
		"serves eval and predict for every task. 60 steps do not learn the tasks: pose AP 0, attributes mA near 0.5" \
		"and a skeleton across predict/prediction.png are what an untrained head gives. Measured runs (200 and 1,000" \
		"steps per task, joint vs single, fine-tune vs scratch): docs/unihcp.md, section 'Measured'."
	@echo "run directories: runs/resnet18_fmnist, runs/declip_vit_tiny_fmnist (metrics.jsonl, checkpoints/, train.log, summary.json)"
	@echo "reports: runs/resnet18_fmnist/eval/report/report.md (ship-readiness), runs/resnet18_fmnist/quant/results.md (W8A8 + onnxruntime)," \
		"runs/declip_vit_tiny_fmnist/eval/zeroshot.json, runs/humans_check/ (synthetic humans with their labels drawn)," \
		"runs/unihcp_tiny_synthetic/eval/*.json and predict/prediction.png (UniHCP, five tasks, one checkpoint)"

# fast tier: every module's units and small end-to-end checks (minutes); a test over its timeout is a hang
test: $(STAMP) fmnist-files
	$(PY) -m pytest -m "not slow" -q --durations=15 --timeout=300 tests

# full tier (CI): also multi-process, elastic, resume-after-SIGKILL, training-quality and benchmark smoke tests
test-all: $(STAMP) fmnist-files
	$(PY) -m pytest -q --durations=30 --timeout=1500 tests

# every benchmark at its measuring settings (clip_mfu.py only where a GPU is); tests/test_benchmarks.py runs
# each at its smallest (--smoke) in the full tier, so none rots unnoticed
bench: $(STAMP) fmnist-files
	@set -e; for b in benchmarks/[!_]*.py; do echo "== $$b"; \
		if [ $$b = benchmarks/clip_mfu.py ] && ! $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
			echo "needs a GPU: skipped"; continue; fi; \
		OMP_NUM_THREADS=1 PYTHONPATH=. $(PY) $$b; done

clean-runs:
	rm -rf runs
