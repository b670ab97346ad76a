# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.penult-installed

.PHONY: demo test lint bench clean browser slurm

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,dask,slurm,clip,openvino]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/penult demo

test: $(STAMP) browser slurm
	$(PY) -m pytest -q -n auto --dist loadfile

# Chromium for the browser tests of `penult serve` (Playwright drives the system's browser);
# where it cannot be installed those tests are skipped and say why.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { SUDO=$$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo "sudo -n"); \
	    $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q chromium >/dev/null 2>&1; } || \
	    echo "Chromium could not be installed: the browser tests will be skipped"; }

# SLURM (slurmctld, slurmd) and munge for the tests of `--cluster slurm:N` and the job-array
# example: the tests start a one-node cluster themselves (tests/slurm.py); no service is started
# here. Where they cannot be installed those tests are skipped and say why.
slurm:
	@{ command -v slurmctld && command -v slurmd && command -v munged && command -v sbatch; } \
	  >/dev/null 2>&1 || \
	  { SUDO=$$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo "sudo -n"); \
	    PKGS="slurm-wlm munge"; OPTS="-y -q --no-install-recommends"; \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install $$OPTS $$PKGS >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null 2>&1 && \
	      $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install $$OPTS $$PKGS >/dev/null 2>&1; } || \
	    echo "SLURM could not be installed: the SLURM tests will be skipped"; }

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/extract_bench.py
	$(PY) benchmarks/classify_bench.py

clean:
	rm -rf $(VENV) demo-out bench-out
