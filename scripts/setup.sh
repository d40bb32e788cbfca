#!/usr/bin/env bash
# Installs surgery and everything its tests need on a fresh machine.
# torch comes first and pinned (2.13.0, a CPU build from local disk here), so that no resolver
# ever pulls a newer, multi-GB build; the project's own range admits the installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q torch==2.13.0
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
"$PY" -m pip install -q -e ".[test]" "torch==${TORCH_VERSION}"
