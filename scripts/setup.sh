#!/usr/bin/env bash
# Creates .venv and installs the project with what export, the embedded server and the tests need.
# torch is pinned to 2.13.0 first: on this kind of machine that is a local CPU build (fast, ~200 MB);
# elsewhere pip downloads it (add --index-url https://download.pytorch.org/whl/cpu for a CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[export,server,dev]"
.venv/bin/python -c "import torch, transformers, onnxruntime, tritonclient; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| onnxruntime', onnxruntime.__version__)"
