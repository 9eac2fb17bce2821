# `make demo` and `make test` build a project-local .venv on first use (torch pinned by constraints.txt,
# torchvision removed: it breaks transformers' image processors on CPU-only machines). The `eval` extra
# (lmms-eval, ~1.2 GB) is installed too: the test-suite runs the real lmms-eval CLI; and the `robot` extra
# (Meta-World + MuJoCo, rendered offscreen with MUJOCO_GL=egl) for the closed-loop policy tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vtprune-installed
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test lint bench env clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,eval,robot]"
	# lmms-eval pulls torchvision (CUDA-only build here) and timm (imports torchvision): both must go
	-$(BIN)/pip uninstall -y -q torchvision timm 2>/dev/null
	$(BIN)/python -c "import importlib.util as u, torch; assert u.find_spec('torchvision') is None; assert torch.__version__ == '2.13.0+cpu', torch.__version__; import mujoco, metaworld; assert mujoco.__version__ == '3.3.0', mujoco.__version__; print('env ok: torch', torch.__version__)"
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m vtprune.cli demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check vtprune tests evals examples

bench: $(STAMP)
	$(BIN)/python evals/bench_overhead.py
	$(BIN)/python evals/bench_divprune.py
	$(BIN)/python evals/bench_kernels.py

clean:
	rm -rf $(VENV) demo_out
