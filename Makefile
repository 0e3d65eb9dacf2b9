# flatlit: `make demo` trains LeNet on real Fashion-MNIST with SGD and SAM and writes a report comparing them;
# `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
FLATLIT := $(VENV)/bin/flatlit
DEMO := runs/demo
DEMO_CKPT = $(DEMO)/$(1)/version_0/checkpoints/last.ckpt
DEMO_SAMPLE := --num_samples 512 --batch_size 256

.PHONY: env demo test lint lock test-latest bench fashion-mnist clean

# The tested environment: the exact versions of requirements.lock (torch and torchvision included), which `make lock`
# resolved from the ranges of requirements.txt and the suite passed with. setup.cfg keeps the ranges for users who
# `pip install` flatlit into an environment of their own.
$(VENV)/.installed: requirements.lock setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

env: $(VENV)/.installed

# Re-resolve requirements.lock from requirements.txt (newest releases within its ranges, torch capped by
# lock-constraints.txt), for every Python >= 3.10 and platform (uv's universal resolution); then run `make test`.
lock: env
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip compile requirements.txt --universal --python-version 3.10 -c lock-constraints.txt \
		--no-header -q -o requirements.lock

# The suite against the newest releases the ranges admit (no lock), in a separate environment.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q -r requirements.txt
	$(LATEST)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(LATEST)/bin/python -m pip freeze | grep -iE '^(torch|torchvision|lightning|numpy|scipy)=='
	$(LATEST)/bin/python -m pytest -q

# Debian's copy of the real Fashion-MNIST, the offline default of the demo (skipped when present or impossible).
fashion-mnist:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] || [ -f data/FashionMNIST/raw/train-images-idx3-ubyte ]; then \
		echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
		  echo "Could not install dataset-fashion-mnist; flatlit will try to download Fashion-MNIST instead."; \
	fi

# The showcase: SGD and SAM runs with Hessian tracking (experiments/demo/), their loss landscapes, a few measures
# and robustness numbers, then one report page comparing them. Every step is rerunnable: a finished training is
# skipped (an interrupted one resumes from its last.ckpt), and landscape/measure/robustness reuse their cached files.
demo: env fashion-mnist $(DEMO)/sgd/version_0/.done $(DEMO)/sam/version_0/.done
	$(FLATLIT) landscape --mode interpolate --ckpt_path $(call DEMO_CKPT,sgd) --ckpt_path $(call DEMO_CKPT,sam) \
		--alphas -0.5:1.5:21 $(DEMO_SAMPLE)
	for run in sgd sam; do \
		$(FLATLIT) landscape --mode line --ckpt_path $(DEMO)/$$run/version_0/checkpoints/last.ckpt \
			--alphas -1:1:21 $(DEMO_SAMPLE) || exit 1; \
		$(FLATLIT) measure --ckpt_path $(DEMO)/$$run/version_0/checkpoints/last.ckpt $(DEMO_SAMPLE) \
			--measures sam_sharpness average_sharpness margin distance_from_init param_norm spectral_norm_product \
			fisher_rao_norm --settings '{average_sharpness: {draws: 20}}' || exit 1; \
		$(FLATLIT) robustness --ckpt_path $(DEMO)/$$run/version_0/checkpoints/last.ckpt --num_samples 500 \
			--noise uniform multiplicative --scales 0.003 0.01 0.03 0.1 --draws 3 \
			--attacks fgsm pgd_linf --eps 2/255 4/255 8/255 --steps 5 || exit 1; \
	done
	$(FLATLIT) report $(DEMO)/sgd/version_0 $(DEMO)/sam/version_0 --output $(DEMO)/report
	@echo ""
	@echo "Report comparing SGD and SAM: $(DEMO)/report/report.html (figures: $(DEMO)/report/*.png)"
	@echo "TensorBoard logs: $(VENV)/bin/tensorboard --logdir $(DEMO)"

# One training of the demo: skipped once finished (.done), resumed from last.ckpt after an interruption, trained
# from scratch when new or when its config changed.
$(DEMO)/%/version_0/.done: experiments/demo/fashion_mnist_%.yaml | env fashion-mnist
	@run=$(DEMO)/$*/version_0; ckpt=$$run/checkpoints/last.ckpt; resume=""; \
	if [ -f $@ ] || [ ! -f $$ckpt ]; then rm -rf $$run; echo "demo: training $* ($<)"; \
	else resume="--ckpt_path $$ckpt"; echo "demo: resuming $* from $$ckpt"; fi; \
	$(FLATLIT) fit --config $< $$resume
	@touch $@

test: env
	$(VENV)/bin/ruff check flatlit tests benchmarks experiments
	$(VENV)/bin/ruff format --check flatlit tests benchmarks experiments
	$(PY) -m pytest -q

lint: env
	$(VENV)/bin/ruff check flatlit tests benchmarks experiments
	$(VENV)/bin/ruff format --check flatlit tests benchmarks experiments

bench: env fashion-mnist
	$(PY) benchmarks/epoch_time.py --json

clean:
	rm -rf runs lightning_logs .pytest_cache

# Reproductions (experiments/reproductions/<name>/, one claim each): the runs of its sweep.yaml (resumable: a second
# call reuses finished trials and resumes interrupted ones), then its analyze.py (figure, numbers and
# runs/reproductions/<name>/verdict.json). `make reproduce` runs them all; each takes at most ~15 min on 2 CPU cores.
REPRODUCTIONS := $(notdir $(patsubst %/,%,$(wildcard experiments/reproductions/*/)))
.PHONY: reproduce $(addprefix reproduce-,$(REPRODUCTIONS))
reproduce: $(addprefix reproduce-,$(REPRODUCTIONS))
$(addprefix reproduce-,$(REPRODUCTIONS)): reproduce-%: env fashion-mnist
	$(FLATLIT) sweep --config experiments/reproductions/$*/sweep.yaml --workers 2
	$(PY) experiments/reproductions/$*/analyze.py
