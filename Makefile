# The course's two commands: `make lab` opens it, `make test` checks all of it.
# Both create .venv and install the course (editable) on a fresh machine first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# JupyterLab refuses to run as root without this flag (containers, CI).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: lab test test-layers test-unit test-notebooks test-browser notebooks install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[browser]'
	touch $(STAMP)

# Trust the committed outputs, so saved widgets and figures render instead of "not trusted".
lab: install
	$(PY) -m jupyter trust notebooks/[0-9][0-9]_*.ipynb
	$(PY) -m jupyter lab $(ROOT_FLAG) --notebook-dir=notebooks

test: install test-layers test-unit test-notebooks

# The import contract in pyproject.toml: ops <- the model <- running it (nothing imports upward).
test-layers: install
	$(VENV)/bin/lint-imports --no-cache

test-unit: install
	COURSE_QUICK=1 $(PY) -m pytest tests/ --ignore=tests/browser -q

# nbval executes every notebook in a fresh kernel of this venv, in quick mode; cells marked
# `# NBVAL_CHECK_OUTPUT` must print what the committed notebook shows.
test-notebooks: install
	COURSE_QUICK=1 $(PY) -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=600 -q notebooks/

test-browser: install
	$(PY) -m pytest tests/browser -q -s

# Re-execute every notebook in reading order, in the default (learner) mode, and save outputs.
notebooks: install
	for nb in notebooks/[0-9][0-9]_*.ipynb; do \
		echo "executing $$nb"; \
		env -u COURSE_QUICK $(PY) -m jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=1200 "$$nb" || exit 1; \
	done

clean:
	rm -rf data/generated .pytest_cache
