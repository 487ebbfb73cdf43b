#!/usr/bin/env python3
"""End-to-end check of the ``blasst`` SGLang backend on a GPU: needle prompt, triton vs blasst.

    python3 benchmarks/gpu/serve_check.py MODEL_DIR [--context 6000] [--prefill-scale S] [--decode-scale S]
                                                    [--calibration FILE --target-sparsity 0.5] [--cuda-graph]

For each backend (``triton``, then ``blasst`` with the given BLASST flags and ``--blasst-stats 1``)
it starts ``python -m sglang.launch_server`` as a subprocess, waits for ``/health``, sends one
greedy ``/generate`` request (a haystack of filler text with a secret number at ``--depth`` and a
question about it), records the answer and its time, and stops the server. Then it prints both
answers, whether each found the needle, the last ``BLASST sparsity`` log line of the blasst server
(the per-layer skip counters) and any ``BLASST:`` fallback warnings. Server logs are kept in
``--log-dir``. Exit status 0 when blasst found the needle and logged its counters.

Needs SGLang and this project installed so that the ``sglang.srt.plugins`` entry point ``blasst``
is visible to the server (e.g. ``python3 -m pip install --no-deps --no-build-isolation --target
/opt/sgl-site .`` on the offline GPU machine, next to ``../shared/gpu/install.sh``'s SGLang).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

FILLER = (
    "The grass is green. The sky is blue. The sun is warm. Bees visit the flowers in the garden. "
    "A river runs past the old mill and the miller counts the sacks of flour. "
)


@dataclass
class Result:
    """One backend's run: its answer, the request's wall time, and the log lines that matter."""

    backend: str
    answer: str
    seconds: float
    prompt_tokens: int
    sparsity_lines: List[str]
    fallback_lines: List[str]
    log: Path


def needle_prompt(tokenizer, context_tokens: int, depth: float, secret: int) -> str:
    """A chat prompt of about ``context_tokens`` tokens with the secret at relative ``depth`` of the haystack."""
    needle = f" The secret number is {secret}. Remember it. "
    per_filler = len(tokenizer.encode(FILLER, add_special_tokens=False))
    n = max(1, context_tokens // per_filler)
    parts = [FILLER] * n
    parts.insert(int(depth * n), needle)
    question = "What is the secret number mentioned in the text above? Answer with the number only."
    messages = [{"role": "user", "content": "".join(parts) + "\n\n" + question}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return messages[0]["content"] + "\nAnswer:"


def http_json(url: str, payload: Optional[dict] = None, timeout: float = 600.0) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll ``/health`` until it answers 200; fail early when the server process exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise RuntimeError(f"server not ready after {timeout:.0f}s")


@contextmanager
def server(args, backend: str, extra: List[str], log: Path):
    """A ``python -m sglang.launch_server`` with ``--attention-backend backend`` + ``extra``, logging to
    ``log``; yields its base URL once ``/health`` answers, and stops it on exit."""
    cmd = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", args.model_dir,
        "--attention-backend", backend, "--port", str(args.port), "--host", "127.0.0.1",
        "--mem-fraction-static", str(args.mem_fraction), "--sampling-backend", "pytorch", "--log-level", "info", *extra,
    ]
    print(f"[serve] {' '.join(cmd)}", flush=True)
    base = f"http://127.0.0.1:{args.port}"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(base, proc, args.start_timeout)
            yield base
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_backend(args, backend: str, extra: List[str], prompt: str) -> Result:
    """Start a server with ``--attention-backend backend`` + ``extra``, ask the needle question, stop it."""
    log = Path(args.log_dir) / f"server_{backend}.log"
    if not args.cuda_graph:
        extra = [*extra, "--disable-cuda-graph"]
    with server(args, backend, extra, log) as base:
        t0 = time.time()
        out = http_json(base + "/generate", {
            "text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": args.max_new_tokens},
        })
        seconds = time.time() - t0
    text = log.read_text(errors="replace")
    return Result(
        backend, out.get("text", ""), seconds, int(out.get("meta_info", {}).get("prompt_tokens", -1)),
        [line for line in text.splitlines() if "BLASST sparsity" in line],
        [line for line in text.splitlines() if "BLASST:" in line],
        log,
    )


def blasst_flags(args) -> List[str]:
    """``--blasst-*`` flags: the calibration if given, per-phase scales (default 2 without a calibration), stats every batch."""
    flags = ["--blasst-stats", "1"]
    if not args.calibration:
        args.prefill_scale = 2.0 if args.prefill_scale is None else args.prefill_scale
        args.decode_scale = 2.0 if args.decode_scale is None else args.decode_scale
    if args.prefill_scale is not None:
        flags += ["--blasst-prefill-threshold-scale", str(args.prefill_scale)]
    if args.decode_scale is not None:
        flags += ["--blasst-decode-threshold-scale", str(args.decode_scale)]
    if args.calibration:
        flags += ["--blasst-calibration", args.calibration, "--blasst-target-sparsity", str(args.target_sparsity)]
    return flags


def check_plugin_installed() -> None:
    from importlib.metadata import entry_points

    if not any(ep.name == "blasst" for ep in entry_points(group="sglang.srt.plugins")):
        sys.exit(
            "the 'blasst' sglang.srt.plugins entry point is not installed: install this project next to SGLang "
            "(pip install --no-deps -e . , or --target /opt/sgl-site . on the offline GPU machine)"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--context", type=int, default=6000, help="haystack length in tokens")
    ap.add_argument("--depth", type=float, default=0.3, help="relative position of the needle in the haystack")
    ap.add_argument("--prefill-scale", type=float, help="--blasst-prefill-threshold-scale (default 2 without --calibration)")
    ap.add_argument("--decode-scale", type=float, help="--blasst-decode-threshold-scale (default 2 without --calibration)")
    ap.add_argument("--calibration", help="--blasst-calibration FILE; a scale given above overrides it for its phase")
    ap.add_argument("--target-sparsity", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--cuda-graph", action="store_true", help="keep CUDA graphs on (off by default: faster start)")
    ap.add_argument("--port", type=int, default=30017)
    ap.add_argument("--mem-fraction", type=float, default=0.3)
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--log-dir", default=os.environ.get("OUT", "."), help="where the server logs go (default $OUT or .)")
    args = ap.parse_args()
    check_plugin_installed()
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    secret = random.Random(args.context).randint(1000, 9999)
    prompt = needle_prompt(tokenizer, args.context, args.depth, secret)
    results = [run_backend(args, "triton", [], prompt), run_backend(args, "blasst", blasst_flags(args), prompt)]

    print(f"\n[serve_check] needle {secret} at depth {args.depth}, prompt {results[0].prompt_tokens} tokens")
    found = {}
    for r in results:
        found[r.backend] = re.search(rf"\b{secret}\b", r.answer) is not None
        print(f"[serve_check] {r.backend:7s} {r.seconds:6.2f}s found={found[r.backend]} answer={r.answer!r} (log {r.log})")
    blasst = results[1]
    print("[serve_check] counters:", blasst.sparsity_lines[-1] if blasst.sparsity_lines else "NO 'BLASST sparsity' LINE LOGGED")
    for line in blasst.fallback_lines:
        print("[serve_check] fallback:", line)
    return 0 if found["blasst"] and blasst.sparsity_lines else 1


if __name__ == "__main__":
    sys.exit(main())
