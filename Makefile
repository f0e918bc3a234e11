# The two set-up commands of the README: `make serve` and `make test`.
# Each installs what it needs on a fresh Debian machine (Python 3.11, root, no GPU).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench

serve: $(STAMP)
	$(VENV)/bin/enhance-node serve

test: $(STAMP)
	scripts/ensure-debian-packages dcmtk orthanc chromium sqlite3 openssl postgresql
	# BM3D, an evaluation-only baseline: non-commercial licence, so never a dependency of the product
	$(VENV)/bin/pip install --quiet bm3d
	# the storage contract suite runs on a real PostgreSQL server too: missing, it fails, never skips.
	# Test processes in parallel (pytest-xdist), one per core up to 4: half the suite waits on
	# peers, servers and subprocesses (about 10 minutes on 2 cores, 16 in one process)
	ENHANCE_NODE_REQUIRE_POSTGRES=1 $(VENV)/bin/python -m pytest --numprocesses auto --maxprocesses 4

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	scripts/ensure-debian-packages dcmtk
	$(VENV)/bin/python bench/receive.py
	$(VENV)/bin/python bench/inference.py
	scripts/ensure-debian-packages orthanc
	$(VENV)/bin/python bench/e2e.py
	scripts/ensure-debian-packages postgresql
	$(VENV)/bin/python bench/scale.py

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,train,postgres]'
	touch $(STAMP)
