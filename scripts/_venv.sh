# Sourced by demo.sh and test.sh: make (or reuse) the virtual environment and install the package.
# torch goes in first as an exact CPU-capable version, so no later requirement can pull a
# multi-GB CUDA build onto a CPU machine. Override with LLM_RUNTIME_TORCH="torch==X.Y.Z".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LLM_RUNTIME_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
export PATH="$VENV/bin:$PATH"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${LLM_RUNTIME_TORCH:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
  python -c "import torch" 2>/dev/null || { echo "torch did not install" >&2; exit 1; }
fi
install_package() {  # $1: extras, e.g. "" or "[test]"
  python -m pip install -q -e "$ROOT$1" 2>&1 | grep -v "^WARNING: Location" || true
  python -c "import llm_runtime, torch" >/dev/null
}
