#!/usr/bin/env bash
# The README's test command: set up (.ci/setup.sh), then run the whole suite on CPU.
# Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
exec "${BLASST_VENV:-.venv}/bin/python" -m pytest -q "$@"
