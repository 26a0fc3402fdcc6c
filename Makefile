# Two commands: `make demo` (the main job on embedded defaults) and `make test` (all tests).
# Both create .venv when it is missing and reinstall only when pyproject.toml changed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
ENGAGE := $(VENV)/bin/engage
export ENGAGE_HOME ?= $(CURDIR)/data

DEMO_CUSTOMERS ?= 10000
DEMO_DAYS ?= 365
DEMO_SEED ?= 7
DEMO_PORT ?= 8000
SIM_DIR := $(ENGAGE_HOME)/simulated/n$(DEMO_CUSTOMERS)-d$(DEMO_DAYS)-s$(DEMO_SEED)

.PHONY: demo test install lint bench mlflow-ui clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

demo: install
	@test -f $(SIM_DIR)/ground_truth.parquet \
		&& echo "reusing simulated data in $(SIM_DIR)" \
		|| $(ENGAGE) simulate --customers $(DEMO_CUSTOMERS) --days $(DEMO_DAYS) --seed $(DEMO_SEED) --out $(SIM_DIR)
	$(ENGAGE) ingest $(SIM_DIR)
	$(ENGAGE) features build
	$(ENGAGE) features apply
	$(ENGAGE) features materialize
	$(ENGAGE) features show --sample 2
	$(ENGAGE) train all
	$(ENGAGE) models compare
	$(ENGAGE) score --overwrite --top 1000 --out $(ENGAGE_HOME)/scores/winback_top1000.parquet
	@test -s $(ENGAGE_HOME)/demo_api_key || $(ENGAGE) serve --generate-key > $(ENGAGE_HOME)/demo_api_key
	@echo "serving until Ctrl-C; API key in $(ENGAGE_HOME)/demo_api_key"
	ENGAGE_API_KEYS=$$(cat $(ENGAGE_HOME)/demo_api_key) $(ENGAGE) serve --port $(DEMO_PORT)

test: install
	$(PY) -m pytest

# After `make demo`: a list scored with a 50% control group, two days of responses simulated from the demo
# world's ground truth, loaded, and the outcome report (HTML under $(ENGAGE_HOME)/reports/, MLflow engage-report).
REPORT_DIR := $(ENGAGE_HOME)/report-demo
# Its own decision log and feedback, so the demo's other lists do not mix in.
REPORT_DB := ENGAGE_SERVING_DB_URL=sqlite:///$(REPORT_DIR)/serving.db
.PHONY: report-demo
report-demo: install
	@test -f $(SIM_DIR)/ground_truth.parquet || { echo "run make demo first (no simulated world in $(SIM_DIR))"; exit 1; }
	@mkdir -p $(REPORT_DIR) && printf 'holdout:\n  share: 0.5\n' > $(REPORT_DIR)/policy.yaml
	ENGAGE_POLICY=$(REPORT_DIR)/policy.yaml $(REPORT_DB) $(ENGAGE) score --overwrite --out $(REPORT_DIR)/list.parquet
	$(REPORT_DB) $(ENGAGE) simulate-respond --list $(REPORT_DIR)/list.parquet --truth $(SIM_DIR) --days 2 --overwrite
	$(ENGAGE) ingest $(REPORT_DIR)/list.responses
	$(REPORT_DB) $(ENGAGE) report --attribution-days 2 --out $(REPORT_DIR)/report.html

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/bench_simulate_snapshot.py
	$(PY) bench/bench_model_quality.py

mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --port 5000

clean:
	rm -rf $(VENV) .pytest_cache
