#!/usr/bin/env bash
# On the GPU machine, from the repo root: install SGLang 0.5.17 from the wheel bundle stashed in
# /root/stash (see ../shared/gpu/README.md for sending it), convert SmolLM2 to /root/smollm2, and
# install this project's wheel (carried in .whl/) next to SGLang so its plugin entry point is found.
# Idempotent: each step is skipped when already done on this machine.
#   bash benchmarks/gpu/setup_gpu.sh && export PYTHONPATH=/opt/sgl-site
set -euo pipefail
STASH=${STASH:-/root/stash}
SITE=${SITE:-/opt/sgl-site}
if [ ! -d "$SITE/sglang" ]; then
    bash "$STASH/install.sh" "$STASH" "$SITE" > /tmp/sgl_install.log 2>&1 || { tail -20 /tmp/sgl_install.log; exit 1; }
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ ! -f /root/smollm2/config.json ]; then
    (cd "$STASH" && cat SmolLM2-135M-Instruct.Q4_1.gguf.part-* > SmolLM2-135M-Instruct.Q4_1.gguf \
        && sha256sum -c gguf.sha256 && python3 convert_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf /root/smollm2) > /tmp/convert.log 2>&1 \
        || { tail -20 /tmp/convert.log; exit 1; }
fi
python3 -m pip install -q --no-deps --no-index --upgrade --target "$SITE" .whl/blasst_sglang-*.whl
python3 -c "from importlib.metadata import entry_points; print('plugin:', [e.value for e in entry_points(group='sglang.srt.plugins')])"
