# syncd — the two commands a new user needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench soak sim clean mosquitto promtool

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

run: $(STAMP) mosquitto  ## simulators + daemon + embedded ClickHouse, live progress, summary
	$(BIN)/syncd demo --duration $${DURATION:-20}

mosquitto:  ## the tests start their own broker; install it when missing
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
	  echo "installing mosquitto (Debian package)"; \
	  (apt-get update -qq && apt-get install -y -qq mosquitto) || \
	  (sudo apt-get update -qq && sudo apt-get install -y -qq mosquitto); }

promtool:  ## tests/test_metrics.py checks /metrics with it; install it when missing (Debian package prometheus)
	@command -v promtool >/dev/null 2>&1 || { \
	  echo "installing promtool (Debian package prometheus)"; \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus) || \
	  (sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends prometheus); }

test: $(STAMP) mosquitto promtool  ## two workers: most tests wait on subprocesses, brokers and backoff, not the CPU
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check syncd tests bench
	$(BIN)/mypy syncd

bench: $(STAMP) mosquitto  ## every figure beside its target, about 13 minutes
	$(BIN)/python bench/bench_iotopen.py
	$(BIN)/python bench/bench_budget.py
	$(BIN)/python bench/bench_streams.py --minutes 2
	$(BIN)/python bench/bench_streams.py --minutes 1.5 --store server
	$(BIN)/python bench/bench_streams.py --minutes 1.5 --daemon floor-apscheduler
	$(BIN)/python bench/bench_streams.py --minutes 1.5 --daemon floor-raw
	$(BIN)/python bench/bench_mqtt.py
	$(BIN)/python bench/bench_startup.py
	$(BIN)/python bench/bench_normalize.py --base 0782be0

soak: $(STAMP) mosquitto  ## 10 minutes of chaos (SIGKILLs, outages, faults) then an exact check; SOAK_ARGS="--duration 90"
	$(BIN)/python bench/soak.py $${SOAK_ARGS:-}

sim: $(STAMP)
	$(BIN)/syncd sim --write-config data/sim.toml

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
