PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo venv clean-venv

venv: $(STAMP)

# Re-install when a requirements file changes.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m pytest -q -n auto --dist loadfile tests

demo: $(STAMP)
	$(VPY) -m utils.demo

clean-venv:
	rm -rf $(VENV)
