# Sourced by the launch scripts: create .venv when missing and install paxgpt
# (editable, so gin/ and launch/ are used from the checkout) with EXTRAS.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRAS="${EXTRAS:-}"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.paxgpt-installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== installing paxgpt${EXTRAS:+[$EXTRAS]} into .venv (first time: several minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  if [[ ",$EXTRAS," == *",test,"* ]] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # The tests' reference models need PyTorch on the CPU only; a plain `torch`
    # is a CUDA build of several GB. Take the CPU build where pip finds it.
    .venv/bin/python -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
      || .venv/bin/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
  .venv/bin/python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
  .venv/bin/python -m pip check
  # Outside the checkout, `import kernels` must still be paxgpt's (Hugging Face's
  # `kernels` package, which transformers >= 5.25 requires, shadows it).
  (cd / && "$ROOT/.venv/bin/python" -c "import kernels, sys; hasattr(kernels, 'BACKENDS') or \
sys.exit('.venv: another package named kernels shadows paxgpt kernels/ (pip uninstall kernels)')")
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
