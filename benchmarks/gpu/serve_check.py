#!/usr/bin/env python3
"""End-to-end check of the ``blasst`` SGLang backend on a GPU: needle prompt, triton vs blasst.

    python3 benchmarks/gpu/serve_check.py MODEL_DIR [--contexts 2000 4000 6000] [--depths 0.1 0.5 0.9]
        [--prefill-scale S] [--decode-scale S] [--calibration FILE --target-sparsity 0.5] [--cuda-graph]

For each backend (``triton``, then ``blasst`` with the given BLASST flags and ``--blasst-stats 1``)
it starts ``python -m sglang.launch_server`` as a subprocess, waits for ``/health``, sends one
greedy ``/generate`` request per needle prompt (a haystack of filler text of each of
``--contexts`` tokens with a secret number at each of ``--depths``, and a question about it),
records the answers and times, and stops the server. Then it prints a table (per prompt: each
backend's answer, whether it found the needle, whether the answers are equal), the last
``BLASST sparsity`` log line of the blasst server (the per-layer skip counters) and any
``BLASST:`` fallback warnings; JSON to ``--log-dir``/serve_check.json beside the server logs.
Exit status 0 when blasst found the needle in every prompt where triton did, and logged its counters.

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
    answers: List[str]
    seconds: List[float]
    prompt_tokens: List[int]
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
    try:  # a server left over on this port would answer in place of the new one
        with urllib.request.urlopen(base + "/health", timeout=2):
            raise RuntimeError(f"port {args.port} already serves: stop that server first (pkill -f '[s]glang.launch_server')")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        pass
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


def run_backend(args, backend: str, extra: List[str], prompts: List[str]) -> Result:
    """Start a server with ``--attention-backend backend`` + ``extra``, ask each needle question, stop it."""
    log = Path(args.log_dir) / f"server_{backend}.log"
    if not args.cuda_graph:
        extra = [*extra, "--disable-cuda-graph"]
    outs, seconds = [], []
    with server(args, backend, extra, log) as base:
        for prompt in prompts:
            t0 = time.time()
            outs.append(http_json(base + "/generate", {
                "text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": args.max_new_tokens},
            }))
            seconds.append(time.time() - t0)
    text = log.read_text(errors="replace")
    return Result(
        backend, [o.get("text", "") for o in outs], seconds,
        [int(o.get("meta_info", {}).get("prompt_tokens", -1)) for o in outs],
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
    ap.add_argument("--contexts", type=int, nargs="+", default=[6000], help="haystack lengths in tokens")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.3], help="relative positions of the needle")
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
    cases = [(n, depth, random.Random(n * 1000 + round(depth * 100)).randint(1000, 9999))
             for n in args.contexts for depth in args.depths]
    prompts = [needle_prompt(tokenizer, n, depth, secret) for n, depth, secret in cases]
    triton, blasst = (run_backend(args, "triton", [], prompts), run_backend(args, "blasst", blasst_flags(args), prompts))

    rows = []
    print(f"\n[serve_check] {'tokens':>6s} {'depth':>5s} {'needle':>6s}  triton found/answer | blasst found/answer | equal")
    for i, (n, depth, secret) in enumerate(cases):
        found = [re.search(rf"\b{secret}\b", r.answers[i]) is not None for r in (triton, blasst)]
        rows.append({"context": n, "prompt_tokens": triton.prompt_tokens[i], "depth": depth, "secret": secret,
                     "triton": {"answer": triton.answers[i], "found": found[0], "seconds": triton.seconds[i]},
                     "blasst": {"answer": blasst.answers[i], "found": found[1], "seconds": blasst.seconds[i]},
                     "equal": triton.answers[i] == blasst.answers[i]})
        print(f"[serve_check] {triton.prompt_tokens[i]:6d} {depth:5.2f} {secret:6d}  {found[0]!s:5s} "
              f"{triton.answers[i]!r:22.22s} | {found[1]!s:5s} {blasst.answers[i]!r:22.22s} | {rows[-1]['equal']}")
    counters = blasst.sparsity_lines[-1] if blasst.sparsity_lines else None
    print("[serve_check] counters:", counters or "NO 'BLASST sparsity' LINE LOGGED")
    for line in blasst.fallback_lines:
        print("[serve_check] fallback:", line)
    ok = bool(counters) and all(r["blasst"]["found"] for r in rows if r["triton"]["found"])
    summary = {"flags": blasst_flags(args), "cuda_graph": args.cuda_graph, "rows": rows, "ok": ok,
               "found": {b: sum(r[b]["found"] for r in rows) for b in ("triton", "blasst")},
               "equal_answers": sum(r["equal"] for r in rows), "n": len(rows),
               "counters": counters, "fallbacks": blasst.fallback_lines}
    (Path(args.log_dir) / "serve_check.json").write_text(json.dumps(summary, indent=1))
    print(f"[serve_check] found triton {summary['found']['triton']}/{len(rows)}, blasst {summary['found']['blasst']}/{len(rows)}, "
          f"equal answers {summary['equal_answers']}/{len(rows)}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
