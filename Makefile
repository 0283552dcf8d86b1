# Each target bootstraps what it needs: a fresh clone runs `make demo` or `make test` directly.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ZOO    ?= models

.PHONY: setup demo test test-fast zoo tools lint typecheck schema bench clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python >= 3.11 is needed (set PYTHON=...)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,modelscope]'
# MTCNN's published weights (the zoo's faces-mtcnn). --no-deps: the wheel pins torch<2.3 and
# numpy<2, older than this project's torch; only its MTCNN networks and weights are used, and
# they run unchanged on ours. Not in pyproject: pip would resolve it by downgrading torch.
	$(PY) -m pip install --quiet --no-deps facenet-pytorch==2.6.0
	touch $@

setup: $(VENV)/.installed

# --large: MogFace and M2FP (random weights, 600 MB, under a minute): the demo shows M2FP and
# the slow tests run both. `make zoo ZOO_FLAGS=` builds the small models only.
ZOO_FLAGS ?= --large

zoo: setup
	$(VENV)/bin/hotswap zoo build --root $(ZOO) $(ZOO_FLAGS)

demo: zoo
	$(VENV)/bin/hotswap demo --root $(ZOO)

# tests/ops run promtool and a real Prometheus, and a producer that is not Python (amqp-tools);
# tests/console a headless Chromium through its driver (chromium, chromium-driver):
# installed from Debian's packages when missing, where we are root and have apt-get. Elsewhere it
# says so here, and those tests fail saying so too.
APT_TOOLS := promtool:prometheus amqp-publish:amqp-tools chromium:chromium chromedriver:chromium-driver
tools:
	@missing=""; for pair in $(APT_TOOLS); do command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; } || echo "not installed:$$missing (apt-get install$$missing): tests/ops and tests/console will fail"
# The broker's own exporter (queue depth, dead-letter queues), which the dashboard and alerts read.
	@! command -v rabbitmq-plugins >/dev/null || rabbitmq-plugins -q is_enabled rabbitmq_prometheus >/dev/null 2>&1 || \
	  rabbitmq-plugins -q enable rabbitmq_prometheus || echo "rabbitmq_prometheus not enabled: the queue-depth queries are checked for syntax only"

test: zoo tools
	HOTSWAP_TEST_ZOO=$(ZOO) $(PY) -m pytest

# Everything but the slow tests (worker processes, long end-to-end runs).
test-fast: zoo tools
	HOTSWAP_TEST_ZOO=$(ZOO) $(PY) -m pytest -m 'not slow'

# The performance benchmarks (ratios against the targets in docs/architecture.md); `hotswap loadtest bench --quick`
# for a shorter run. Reports; exits non-zero only when a benchmark cannot run.
bench: zoo
	$(VENV)/bin/hotswap loadtest bench

lint: setup
	$(VENV)/bin/ruff check schemas worker control loadtest console tests
	$(VENV)/bin/mypy

schema: setup
	$(VENV)/bin/hotswap schema --write

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache out
