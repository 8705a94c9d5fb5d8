# make book  : set up .venv and build the HTML book from the committed notebook outputs (no training)
# make test  : everything CI checks (unit tests, papermill smoke runs, nbval, hygiene, strict book build)
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
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

book: venv
	$(JB) build . --warningiserror --nitpick --keep-going
	@echo "Open _build/html/index.html"

test: venv
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env -ra
	$(JB) build . --all --warningiserror --nitpick --keep-going

smoke: venv
	$(PY) -m pytest tests/test_notebooks.py -k smoke -ra

run: venv
	$(PY) -m normlab run $(EXP) --profile $(PROFILE)

notebooks: venv
	$(PY) -m jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.kernel_name=python3 --ExecutePreprocessor.timeout=600 \
	    --ExecutePreprocessor.record_timing=False $(NB)

clean:
	rm -rf _build
