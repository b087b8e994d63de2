# Two entry points: `make demo` (the main job) and `make test`. Both set everything up from nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
SEQ := $(VENV)/bin/seqvision

.PHONY: setup data demo test test-all

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,hub,export,serve,experiments]'
	touch $@

# Fashion-MNIST: Debian's dataset-fashion-mnist package where apt exists (root or sudo); elsewhere (macOS,
# Fedora, no root) seqvision downloads the four files on first use into ~/.cache/seqvision (or
# $SEQVISION_DATA), checking their SHA-256.
data:
	@if dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1; }; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist || \
	  echo "apt could not install dataset-fashion-mnist: seqvision will download Fashion-MNIST instead"; \
	else echo "no apt here: seqvision downloads Fashion-MNIST into $${SEQVISION_DATA:-~/.cache/seqvision} on first use"; fi

RUN ?= runs/main-job

# Train a Sequencer2D on Fashion-MNIST on the CPU (about 13 minutes on 2 cores), evaluate it, write a report.
# Rerunning continues or re-reports the same run folder.
demo: setup data
	$(SEQ) train --config small --data fashion-mnist --output $(RUN) --resume
	$(SEQ) validate --checkpoint $(RUN) --output $(RUN)/validation
	@echo "report: $(RUN)/report.md"

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''
