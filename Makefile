# The two commands: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-fast venv data clean

venv: $(STAMP)

# pyproject.toml holds version floors; constraints.txt the exact versions tested (torch 2.14.1,
# torchvision 0.29.1, ...). pip takes them from the local wheel cache when present.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST comes from Debian's package (the demo's data, and some tests'); so does the
# headless browser that opens `usi inspect --html`'s page in the slow tier (Debian's chromium).
data:
	@test -d $(FMNIST) || { echo "installing Debian's dataset-fashion-mnist"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist; }
	@command -v chromium >/dev/null || { echo "installing Debian's chromium"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

demo: $(STAMP) data
	$(BIN)/usi demo

# The fast tier (unit tests, < 1 min) first, so that a broken build fails early; then the
# slow tier (end-to-end runs: torchrun, whole trainings, subprocesses). Together: every test.
test-fast: $(STAMP) data
	$(BIN)/python -m pytest -q -m "not slow" tests

test: test-fast
	$(BIN)/python -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) runs/demo
