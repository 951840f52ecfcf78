# The two commands a newcomer needs: `make demo` and `make test` (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv setup test unit lint demo clean mutation fuzz faults bench compat

$(BIN)/pip:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The test venv: the core, the test tools and the [demo] extra (the test extra pulls it in).
$(VENV)/.installed-test: pyproject.toml | $(BIN)/pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# What `make demo` needs and no more: the core and the [demo] extra (pamqp, for the embedded broker).
$(VENV)/.installed-demo: pyproject.toml | $(BIN)/pip
	$(BIN)/pip install -q -e '.[demo]'
	touch $@

venv: $(VENV)/.installed-test

# Machine prerequisites for the integration tests: RabbitMQ STOMP plugin, ActiveMQ, RabbitMQ's TLS listeners
# (5671, 61614: a machine CA; RabbitMQ restarted the first time only) in .ci/setup-machine, Rucio server venv.
setup: venv
	bash .ci/setup-machine
	$(BIN)/python -m injector.testbed.rucio --ensure-venv

lint: venv
	$(BIN)/ruff check injector producers consumers operations tests benchmarks
	$(BIN)/mypy

unit: venv
	$(BIN)/python -m pytest tests/unit -q

test: setup lint
	CI=$${CI:-true} $(BIN)/python -m pytest -q

# The Rucio LTS server sites still run (a server older than our rucio-clients): the ingest, cleanup and reconcile
# integration tests against it (README "Install": supported servers).
COMPAT_RUCIO ?= 38.6.4
COMPAT_TESTS := tests/integration/test_ingest_rucio.py tests/integration/test_cleanup_rucio.py \
	tests/integration/test_reconcile_rucio.py
compat: setup
	RUCIO_INJECTOR_RUCIO_SERVER=$(COMPAT_RUCIO) $(BIN)/python -m injector.testbed.rucio --ensure-venv
	CI=$${CI:-true} RUCIO_INJECTOR_RUCIO_SERVER=$(COMPAT_RUCIO) $(BIN)/python -m pytest -q -p no:cacheprovider \
		$(COMPAT_TESTS)

demo: $(VENV)/.installed-demo
	bash .ci/setup-machine --demo
	$(BIN)/rucio-injector demo $(DEMO_ARGS)

# Every figure of the scale issue in one run on a throw-away Rucio server (~20 min); BENCH_ARGS=--quick: a few
# hundred files (CI), so the script never rots.
bench: setup
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# On demand, the long runs (their short versions are in `make test`): 10,000 + 5,000 generated hostile messages
# through the real consumers; the fault campaign, 10 minutes of 5 files/s, 60 faults (restarts this machine's RabbitMQ).
fuzz: setup
	CI=true FUZZ_CASES=$${FUZZ_CASES:-10000} $(BIN)/python -m pytest -q -s tests/integration/test_fuzz_consumers.py
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-10000} $(BIN)/python -m pytest -q tests/unit/test_fuzz.py -p no:cacheprovider

faults: setup
	$(BIN)/python -m tests.faults.campaign --minutes $${FAULT_MINUTES:-10} --rate $${FAULT_RATE:-5} \
		--seed $${FAULT_SEED:-7} --faults $${FAULT_COUNT:-60} --outage-cap 60 \
		--json $${FAULT_JSON:-fault-campaign.json}

# On demand: mutants of the core decisions ([tool.mutmut] in pyproject.toml) judged by the unit tests.
mutation: venv
	$(BIN)/pip install -q -e '.[test,mutation]'
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2 || true
	$(BIN)/mutmut results | grep -c survived || true

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache mutants
