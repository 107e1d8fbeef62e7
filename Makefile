# The commands of the course (see README):
#   make lab    set up on first use, then open JupyterLab on the notebooks (127.0.0.1, token auth on)
#   make test   set up on first use, then run the unit tests and every notebook under nbval
#   make check  the unit tests only (no notebooks, no browser): what a contributor runs while working
# Override on the command line, e.g. `make lab PYTHON=python3.12`, or on Linux without a GPU,
# `make lab TORCH_INDEX=https://download.pytorch.org/whl/cpu` to fetch PyTorch's small CPU-only build.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PORT ?= 8888
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
TORCH_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

# Bytecode: pip installs with --no-compile (about a minute faster), and where PYTHONDONTWRITEBYTECODE is set
# every process would then compile torch's sources again (import torch plus the torch._dynamo that the first
# optimizer imports: about 15 s, against 4 s from bytecode, per kernel on 2 cores). So what the commands
# below import is compiled once, on first import, into $(VENV)/pycache, and nothing lands beside the sources.
export PYTHONPYCACHEPREFIX := $(abspath $(VENV))/pycache
unexport PYTHONDONTWRITEBYTECODE

.PHONY: lab test check colab-check notebooks results setup setup-test clean-venv

setup: $(VENV)/.course-installed
setup-test: $(VENV)/.test-installed

$(VENV)/.course-installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install --no-compile -q "$(TORCH_SPEC)" $(TORCH_ARGS)
	$(PIP) install --no-compile -q -e ".[lab]"
	@touch $@

$(VENV)/.test-installed: $(VENV)/.course-installed
	$(PIP) install --no-compile -q -e ".[test]"
	@touch $@

# Jupyter refuses to run as root (a container, a cloud shell) unless told; say so and how, before it does.
LAB_ARGS ?=
lab: setup
	@if [ "$$(id -u 2>/dev/null)" = 0 ] && ! echo "$(LAB_ARGS)" | grep -q -- --allow-root; then \
		echo "make lab: you are root here (a container?), and JupyterLab will not start as root unless asked."; \
		echo "In a container you control, run:  make lab LAB_ARGS=--allow-root"; \
		echo "(it still listens on 127.0.0.1 only, with token authentication on)."; exit 1; fi
	cd notebooks && ../$(BIN)/jupyter lab --ip=127.0.0.1 --port=$(PORT) \
		--ServerApp.open_browser=True $(LAB_ARGS)

# Two workers: each notebook runs whole on one of them (--dist loadscope, see conftest.py), in file
# order (notebooks that reload an earlier one's checkpoint find it; 08 runs after 07 on the same worker), and
# each kernel uses half the cores (setup_notebook), so two notebooks at once fill the machine. Override with
# `make test WORKERS=1`.
WORKERS ?= 2

# The static images beside charts (kaleido) are for the committed notebooks, not for checking them: off here.
test: setup-test
	COURSE_PROFILE=cpu COURSE_STATIC_FIGURES=0 $(BIN)/python -m pytest tests notebooks --nbval --nbval-cell-timeout=900 \
		--nbval-sanitize-with tests/nbval_sanitize.cfg -q -n $(WORKERS) --dist loadscope --no-loadscope-reorder

# Unit tests only, two workers: about half a minute on 2 cores once the environment exists.
check: setup-test
	COURSE_PROFILE=cpu $(BIN)/python -m pytest tests -q -n $(WORKERS) -m "not browser"

# The widget tests under the package versions Colab ships (README, Colab), in a venv of their own; the course is
# installed with --no-deps there, as the notebooks' first cell does on Colab.
COLAB_VENV ?= .venv-colab
COLAB_PINS := ipywidgets==7.7.1 plotly==5.24.1 anywidget==0.9.21 einops==0.8.2 numpy==2.1.3 tqdm==4.67.3 ipython==7.34.0
colab-check:
	@test -x $(COLAB_VENV)/bin/python || $(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_VENV)/bin/python -m pip install --disable-pip-version-check -q "$(TORCH_SPEC)" $(TORCH_ARGS) $(COLAB_PINS) \
		pytest pytest-timeout nbformat pyyaml
	$(COLAB_VENV)/bin/python -m pip install --disable-pip-version-check -q --no-deps -e .
	COURSE_PROFILE=cpu $(COLAB_VENV)/bin/python -m pytest tests/test_widgets.py tests/test_static_views.py -q

# Re-run notebooks top to bottom under the cpu profile and store their outputs (what learners read on
# the web), without widget state: each chart keeps a PNG beside its interactive version, and
# tools/strip_widget_views.py drops the references to live widgets that no longer exist, leaving their
# static copies. One notebook: make notebooks NB=00_setup_and_baseline.ipynb
notebooks: setup-test
	cd notebooks && for nb in $(or $(NB),*.ipynb); do \
		COURSE_PROFILE=cpu ../$(BIN)/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.store_widget_state=False --ExecutePreprocessor.timeout=1800 $$nb || exit 1; \
		../$(BIN)/python ../tools/strip_widget_views.py $$nb || exit 1; \
	done

# Notebook 08's report card and the notebooks' run times feed the README (python tools/report.py):
# re-run notebook 08, copy its card to assets/, regenerate the README's results table. After a `make test`,
# `make results TIMES=test-artifacts/notebook_times.json` also refreshes the run-time column.
results: setup-test
	$(MAKE) notebooks NB=08_nano_deepseek.ipynb
	$(BIN)/python tools/report.py --card notebooks/checkpoints/08_report_card_cpu.json $(if $(TIMES),--times $(TIMES),)

clean-venv:
	rm -rf $(VENV)
