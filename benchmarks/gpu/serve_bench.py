#!/usr/bin/env python3
"""Serving benchmark on a GPU: ``blasst`` vs ``triton`` backends of one SGLang server each.

    python3 benchmarks/gpu/serve_bench.py MODEL_DIR [--prefill-scale 512] [--decode-scale 512] [--out DIR]

Per backend (CUDA graphs on): time to first token of single requests at 2K/4K/8K-token prompts
(median of 3, each prompt new so the radix cache never hits), decode throughput of one request
generating 256 tokens after a 4K prompt, then a concurrent load: 200 requests, 32 in flight,
prompts of 256 to 7,000 tokens, 16 to 128 new tokens each; every request must succeed. Prints a
table and writes ``serve_bench.json`` with the blasst server's last sparsity log line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serve_check import blasst_flags, check_plugin_installed, http_json, server  # noqa: E402

WORDS = "the of and to in is was that for it as with his on be at by had are but from or have an they which one you were".split()


def text_of(tokenizer, n_tokens: int, rng: random.Random) -> str:
    """A prompt of about ``n_tokens`` tokens of random words (new every call: no prefix-cache hits)."""
    words = [rng.choice(WORDS) for _ in range(int(n_tokens * 1.1))]
    ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[:n_tokens]
    return tokenizer.decode(ids)


def generate(base, text, max_new_tokens):
    t0 = time.time()
    out = http_json(base + "/generate", {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}})
    return time.time() - t0, out


def measure(args, backend, extra, tokenizer):
    rng = random.Random(0)
    res = {"backend": backend}
    log = Path(args.out) / f"bench_server_{backend}.log"
    with server(args, backend, extra, log) as base:
        generate(base, text_of(tokenizer, 512, rng), 4)  # warm-up
        for n in (2048, 4096, 8000):
            res[f"ttft_{n}_s"] = statistics.median(generate(base, text_of(tokenizer, n, rng), 1)[0] for _ in range(3))
        t_one, _ = generate(base, text_of(tokenizer, 4096, rng), 1)
        t_all, out = generate(base, text_of(tokenizer, 4096, rng), 257)
        res["decode_tok_per_s_after_4k"] = 256 / max(t_all - t_one, 1e-6)
        load = [(text_of(tokenizer, rng.randint(256, 7000), rng), rng.randint(16, 128)) for _ in range(200)]
        t0 = time.time()
        errors = 0
        with ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(generate, base, t, m) for t, m in load]
            outs = []
            for fut in futures:
                try:
                    outs.append(fut.result())
                except Exception:  # counted, reported
                    errors += 1
        res["load_seconds"] = time.time() - t0
        res["load_errors"] = errors
        res["load_output_tok_per_s"] = sum(o["meta_info"]["completion_tokens"] for _, o in outs) / res["load_seconds"]
        text = log.read_text(errors="replace")
    res["sparsity_line"] = next((line for line in reversed(text.splitlines()) if "BLASST sparsity" in line), None)
    res["fallbacks"] = sorted({line.split("BLASST:")[1].strip() for line in text.splitlines() if "BLASST:" in line})
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--prefill-scale", type=float, default=512.0)
    ap.add_argument("--decode-scale", type=float, default=512.0)
    ap.add_argument("--calibration")
    ap.add_argument("--target-sparsity", type=float, default=0.5)
    ap.add_argument("--port", type=int, default=30018)
    ap.add_argument("--mem-fraction", type=float, default=0.5)
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    check_plugin_installed()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    flags = blasst_flags(args)
    flags[flags.index("--blasst-stats") + 1] = "50"
    results = [measure(args, "triton", [], tokenizer), measure(args, "blasst", flags, tokenizer)]
    with open(Path(args.out) / "serve_bench.json", "w") as f:
        json.dump({"model": args.model_dir, "blasst_flags": flags, "results": results}, f, indent=1)
    keys = [k for k in results[0] if k not in ("backend", "sparsity_line", "fallbacks")]
    print(f"{'metric':28s} {'triton':>10s} {'blasst':>10s}")
    for k in keys:
        print(f"{k:28s} {results[0][k]:10.3f} {results[1][k]:10.3f}")
    print("blasst:", results[1]["sparsity_line"])
    print("fallbacks:", results[1]["fallbacks"])
    return 0 if all(r["load_errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
