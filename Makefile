# The two commands of the README: `make app` (set up, then open napari with the plugin) and
# `make test` (set up, then run the whole test suite under a virtual display).
VENV ?= .venv
PY := $(VENV)/bin/python
# CI and tests use the CPU build; GPU users run `make setup TORCH=torch` to get their CUDA build.
TORCH ?= torch==2.13.0
export QT_API := pyqt5

.PHONY: setup system-deps app test test-qt6 bench default-model
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Headless Qt needs a virtual X server and the xcb libraries Qt loads.
system-deps:
	@command -v xvfb-run >/dev/null && ldconfig -p | grep -q libxkbcommon-x11 || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-render-util0 \
	    libxcb-randr0 libxcb-shape0 libxcb-xfixes0 libxcb-xkb1 libxkbcommon-x11-0 libgl1 libegl1 \
	    libfontconfig1 libdbus-1-3; }

app: setup
	$(VENV)/bin/napari-unet annotate $(CASE)

test: setup system-deps
	xvfb-run -a -s "-screen 0 1600x1000x24" $(PY) -m pytest $(PYTEST_ARGS)

# The Qt tests on PyQt6, in a virtual environment of their own.
QT6_VENV ?= .venv-qt6
$(QT6_VENV)/.installed: pyproject.toml
	python3 -m venv $(QT6_VENV)
	$(QT6_VENV)/bin/python -m pip install -q --upgrade pip
	$(QT6_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(QT6_VENV)/bin/python -m pip install -q -e ".[test,pyqt6]"
	$(QT6_VENV)/bin/python -m pip uninstall -q -y PyQt5 PyQt5-sip PyQt5-Qt5
	touch $@

test-qt6: $(QT6_VENV)/.installed system-deps
	QT_API=pyqt6 PYTEST_QT_API=pyqt6 xvfb-run -a -s "-screen 0 1600x1000x24" $(QT6_VENV)/bin/python -m pytest -o qt_api=pyqt6 tests/_qt $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_predict.py
