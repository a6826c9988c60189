# make run: install into .venv and serve; make test: install and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install run serve test test-all chaos bench demo clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

run: install            ## serve on HOST:PORT with the download workers (laptop, ngrok)
	$(PY) app.py

serve: install          ## the same under gunicorn (production)
	$(VENV)/bin/gunicorn -c gunicorn.conf.py 'app:create_app()'

test: install           ## the test suite CI runs
	$(PY) -m pytest -m "not slow"

test-all: install       ## everything, including the slow chaos rounds
	$(PY) -m pytest

chaos: install          ## the chaos suite alone, with its summary table
	$(PY) bench/chaos.py

bench: install          ## every benchmark (see bench/README.md)
	$(PY) bench/run_all.py

demo: install           ## a local Webex emulator, the bot, and a few sample files
	$(PY) demo.py

clean:
	rm -rf $(VENV) .pytest_cache
