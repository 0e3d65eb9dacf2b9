# flatlit: `make demo` trains the quickstart on real Fashion-MNIST; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
DEMO_CONFIG ?= experiments/quickstart/fashion_mnist_sgd.yaml

.PHONY: env demo test lint bench fashion-mnist clean

$(VENV)/.installed: requirements.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

env: $(VENV)/.installed

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

demo: env fashion-mnist
	$(VENV)/bin/flatlit fit --config $(DEMO_CONFIG)
	@echo ""
	@echo "TensorBoard logs, history.csv and config.yaml are in: runs/quickstart/"
	@echo "View them with:  $(VENV)/bin/tensorboard --logdir runs"

test: env
	$(PY) -m pytest -q

lint: env
	$(VENV)/bin/ruff check flatlit tests benchmarks
	$(VENV)/bin/ruff format --check flatlit tests benchmarks

bench: env fashion-mnist
	$(PY) benchmarks/epoch_time.py --json

clean:
	rm -rf runs lightning_logs .pytest_cache
