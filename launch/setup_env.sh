# Sourced by the launch scripts: create .venv when missing and install paxgpt
# (editable, so gin/ and launch/ are used from the checkout) with EXTRAS.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRAS="${EXTRAS:-}"
# jax 0.11+ needs Python 3.12: take $PYTHON, else python3.12 (on PATH or pyenv's).
is_312() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }
find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.12 \
                   "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 python3; do
    if [ -n "$candidate" ] && is_312 "$candidate"; then
      echo "$candidate"
      return
    fi
  done
  echo "paxgpt needs Python 3.12 or newer (set PYTHON=/path/to/python3.12)" >&2
  return 1
}
if [ -x .venv/bin/python ] && ! is_312 .venv/bin/python; then
  echo "== .venv has an older Python than 3.12: recreating it"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  PYTHON="$(find_python)"
  echo "== creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.paxgpt-installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== installing paxgpt${EXTRAS:+[$EXTRAS]} into .venv (first time: several minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  if [[ ",$EXTRAS," == *",test,"* ]] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # The tests' reference models need PyTorch on the CPU only; a plain `torch`
    # is a CUDA build of several GB. Take the CPU build where pip finds it (PyTorch's
    # own index); where that is out of reach, the project's install takes PyPI's.
    .venv/bin/python -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
      || .venv/bin/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu \
        2>/dev/null \
      || echo "== no CPU build of PyTorch reachable: installing PyPI's (several GB)"
  fi
  .venv/bin/python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
  .venv/bin/python -m pip check
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
