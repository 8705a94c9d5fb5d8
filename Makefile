# make book  : set up .venv and build the HTML book from the committed notebook outputs (no training)
# make test  : everything CI checks (strict book build, unit tests, papermill smoke runs, nbval, hygiene,
#              every page in headless Chromium offline; screenshots in _build/screenshots/index.html)
# make smoke : only the papermill smoke runs of every notebook
# make run EXP=gn_batch_size PROFILE=cpu : record one experiment into results/EXP/PROFILE.json
# make notebooks : re-execute the committed notebooks in place (profile "recorded") to refresh outputs
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JB := $(VENV)/bin/jupyter-book
PROFILE ?= cpu
NB ?= notebooks/*.ipynb

.PHONY: venv book test smoke run notebooks clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

book: venv
	$(JB) build . --warningiserror --nitpick --keep-going
	@echo "Open _build/html/index.html"

# The strict build comes first: tests/test_browser.py opens the pages it writes in headless Chromium.
test: venv
	$(JB) build . --all --warningiserror --nitpick --keep-going
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env -ra

smoke: venv
	$(PY) -m pytest tests/test_notebooks.py -k smoke -ra

run: venv
	$(PY) -m normlab run $(EXP) --profile $(PROFILE)

notebooks: venv
	JUPYTER_PATH=$(VENV)/share/jupyter $(VENV)/bin/jupyter-execute --inplace --kernel_name=python3 \
	    --timeout=1200 $(NB)
	$(PY) -c "import sys; sys.path.insert(0, 'tests'); import nbtools; [nbtools.tidy(p) for p in sys.argv[1:]]" $(NB)

clean:
	rm -rf _build
