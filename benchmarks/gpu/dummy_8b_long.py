#!/usr/bin/env python3
"""Llama-3.1-8B shapes, dummy weights, TP 1: 32K-token prefill and decode speed, triton vs blasst.

One-GPU kind (nvidia-h100-x1; about 2-3 min per config after SGLang's first-start JIT, so at most
two configs per 10-minute call), from the repo root:

    bash benchmarks/gpu/setup_gpu.sh && export PYTHONPATH=/opt/sgl-site
    python3 benchmarks/gpu/dummy_8b_long.py --configs triton blasst0                 # call 1
    python3 benchmarks/gpu/dummy_8b_long.py --configs blasst4096 --attention-share   # call 2
    # JSON to $OUT/dummy_8b_long_<configs>.json, server logs beside it; end-to-end results also
    # accumulate in /tmp/dummy_8b_long_e2e.json on the GPU machine while it stays up

Writes a config folder (``--model-dir``, default /tmp/llama31_8b_dummy): 32 layers, hidden 4096,
32 / 8 heads of dim 128, intermediate 14336, vocab 128256, rope theta 500000 (llama3 rope scaling),
max position 131072, SmolLM2's tokenizer files (prompts are sent as token ids, so its smaller
vocabulary does not matter). Each config is one ``python -m sglang.launch_server --load-format dummy``
(CUDA graphs on, decode batch up to 16, context 40960): ``triton``, ``blasst0`` (threshold scale 0,
dense through BLASST's kernels) and ``blasst<S>`` (scale S for both phases), measuring

* ``prefill_32k_s``: median time of ``--reps`` greedy 1-token requests, each a new random 32K prompt
  (no radix-cache hit; SGLang prefills it in chunks of its ``--chunked-prefill-size``);
* ``decode_tok_s_bs1`` / ``decode_tok_s_bs8``: batches of 1 and 8 cached 32K prompts:
  tokens / (time of ``--decode-tokens + 1`` new tokens - time of 1), i.e. decode steps only.

SGLang's dummy weights are uniform in ±1e-3, so attention is near-uniform and BLASST skips
(almost) nothing end to end: ``blasst<S>`` measures the cost of the skip check, not its savings.

``--attention-share`` (no server): the attention kernels alone at this model's per-layer shapes on
synthetic peaked data (``benchmarks/synthetic.py``), times 32 layers: SGLang's triton extend / decode
kernels, BLASST dense and BLASST at each ``--scales`` with the fraction of tiles skipped. Divided
by the end-to-end times (this call's and earlier ones' in ``--e2e-json``), that is the attention
share of prefill and decode time; ``projected_with_synthetic_sparsity`` puts the skipping kernel's
time in place of the dense one in blasst0's end-to-end times (the gain if the model's attention
were as peaked as the synthetic data).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from serve_check import check_plugin_installed, http_json, server  # noqa: E402
from tp_check import llama_config, write_model_folder  # noqa: E402

LLAMA31_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
    rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)


def config_flags(name: str):
    """``(backend, flags)`` of a config name: ``triton``, ``blasst0``, ``blasst<S>``."""
    if name == "triton":
        return "triton", []
    if not name.startswith("blasst"):
        raise ValueError(f"unknown config {name!r}: triton, blasst0 or blasst<S>")
    scale = f"{float(name[len('blasst'):]):g}"
    return "blasst", ["--blasst-prefill-threshold-scale", scale, "--blasst-decode-threshold-scale", scale]


def generate(base: str, prompts, new_tokens: int) -> float:
    """Seconds for one greedy batch request of token-id ``prompts``."""
    t0 = time.time()
    http_json(base + "/generate", {"input_ids": prompts, "sampling_params": {
        "temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}}, timeout=1800)
    return time.time() - t0


def measure(args, name: str, rng: random.Random) -> dict:
    """Start one server, time prefill and decode, stop it."""
    backend, flags = config_flags(name)
    extra = [*flags, "--load-format", "dummy", "--context-length", str(args.context_length),
             "--max-running-requests", "16", "--cuda-graph-max-bs-decode", "16", "--random-seed", "0", *args.server_args]
    log = Path(args.out) / f"server_8b_{name}.log"

    def prompt():
        return [rng.randrange(100, 49152) for _ in range(args.prompt_len)]

    res = {"config": name, "backend": backend, "flags": extra}
    t0 = time.time()
    with server(args, backend, extra, log) as base:
        res["ready_s"] = round(time.time() - t0, 1)
        generate(base, [prompt()], 4)  # warm-up: JIT of every kernel at these shapes
        res["prefill_32k_all_s"] = [generate(base, [prompt()], 1) for _ in range(args.reps)]
        res["prefill_32k_s"] = statistics.median(res["prefill_32k_all_s"])
        for bs in (1, 8):
            batch = [prompt() for _ in range(bs)]
            generate(base, batch, 1)  # prefill, cached from here on
            t_one = generate(base, batch, 1)
            t_all = generate(base, batch, args.decode_tokens + 1)
            res[f"decode_tok_s_bs{bs}"] = bs * args.decode_tokens / max(t_all - t_one, 1e-6)
            res[f"decode_step_ms_bs{bs}"] = 1e3 * (t_all - t_one) / args.decode_tokens
    text = log.read_text(errors="replace")
    res["fallbacks"] = sorted({line.split("BLASST:")[1].strip() for line in text.splitlines() if "BLASST:" in line})
    return res


def sglang_triton_prefill(q, k, v, cu, max_len):
    """SGLang's triton extend kernel over one causal pass with no cached prefix (zero-argument callable)."""
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    o, empty_kv, idx = torch.empty_like(q), torch.zeros_like(cu), torch.zeros(1, dtype=torch.int32, device=q.device)
    return lambda: extend_attention_fwd(q, k, v, o, k, v, cu, empty_kv, idx, None, True, None, max_len, 1.0, 1.0,
                                        sm_scale=q.shape[2] ** -0.5)


def sglang_triton_decode(q, k_buffer, v_buffer, kv_indptr, kv_indices, max_splits=16):
    """SGLang's triton decode kernel (zero-argument callable)."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    batch, hq, d = q.shape
    o = torch.empty_like(q)
    logits = torch.empty(batch, hq, max_splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, hq, max_splits, dtype=torch.float32, device=q.device)
    splits = torch.full((batch,), max_splits, dtype=torch.int32, device=q.device)
    return lambda: decode_attention_fwd(q, k_buffer, v_buffer, o, kv_indptr, kv_indices, logits, lse, splits,
                                        max_splits, d ** -0.5, 1.0, 1.0)


def attention_share(args, e2e: dict) -> dict:
    """Attention kernels alone at the 8B's per-layer shapes, x layers; and their share of ``e2e`` times."""
    from bench_kernels import bench, decode_inputs, measured_sparsity, prefill_inputs, run_prefill

    from blasst_kernels import decode_attention

    layers, hq, hkv, d, n = LLAMA31_8B["num_hidden_layers"], 32, 8, 128, args.prompt_len
    q, k, v, cu = prefill_inputs([n], hq, hkv, d, 1.0)
    prefill = {"sglang triton": bench(sglang_triton_prefill(q, k, v, cu, n)),
               "blasst0": bench(lambda: run_prefill(q, k, v, cu, n, None))}
    sparsity = {}
    for s in args.scales:
        prefill[f"blasst{s:g}"] = bench(lambda: run_prefill(q, k, v, cu, n, s))
        sparsity[f"prefill blasst{s:g}"] = measured_sparsity(lambda st: run_prefill(q, k, v, cu, n, s, st), hq)
    decode = {}
    for bs in (1, 8):
        data, _ = decode_inputs(bs, n, hq, hkv, d, 1, 1.0)
        decode[f"bs{bs} sglang triton"] = bench(sglang_triton_decode(*data))
        decode[f"bs{bs} blasst0"] = bench(lambda: decode_attention(*data))
        for s in args.scales:
            decode[f"bs{bs} blasst{s:g}"] = bench(lambda: decode_attention(*data, threshold_scale_factor=s))
            sparsity[f"decode bs{bs} blasst{s:g}"] = measured_sparsity(
                lambda st: decode_attention(*data, threshold_scale_factor=s, stats=st), hq)
    out = {"per_layer_ms": {"prefill": prefill, "decode": decode}, "sparsity": sparsity, "layers": layers}
    # Share of a config's end-to-end time: triton's kernel for triton, BLASST's dense kernel for blasst*
    # (dummy weights: nothing skipped end to end).
    shares = {}
    for name, res in e2e.items():
        kernel = "sglang triton" if name == "triton" else "blasst0"
        shares[name] = {"prefill": layers * prefill[kernel] / (1e3 * res["prefill_32k_s"])}
        for bs in (1, 8):
            shares[name][f"decode_bs{bs}"] = layers * decode[f"bs{bs} {kernel}"] / res[f"decode_step_ms_bs{bs}"]
    out["attention_share"] = shares
    # blasst0's end-to-end times with its attention replaced by the kernel's time at each scale on synthetic data.
    if "blasst0" in e2e:
        base = e2e["blasst0"]
        out["projected_with_synthetic_sparsity"] = {
            f"blasst{s:g}": {
                "prefill_32k_s": base["prefill_32k_s"] - layers * (prefill["blasst0"] - prefill[f"blasst{s:g}"]) / 1e3,
                **{f"decode_step_ms_bs{bs}": base[f"decode_step_ms_bs{bs}"]
                   - layers * (decode[f"bs{bs} blasst0"] - decode[f"bs{bs} blasst{s:g}"]) for bs in (1, 8)},
            } for s in args.scales
        }
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="*", default=["triton", "blasst0", "blasst4096"],
                    help="triton, blasst0, blasst<S> (threshold scale S, both phases); none: --attention-share only")
    ap.add_argument("--attention-share", action="store_true", help="also time the attention kernels alone (see above)")
    ap.add_argument("--scales", nargs="+", type=float, default=[4096.0], help="BLASST scales for --attention-share")
    ap.add_argument("--e2e-json", default="/tmp/dummy_8b_long_e2e.json",
                    help="end-to-end results kept across calls on the GPU machine (read, then updated)")
    ap.add_argument("--prompt-len", type=int, default=32768)
    ap.add_argument("--context-length", type=int, default=40960)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="more flags for every server (last option)")
    ap.add_argument("--model-dir", default="/tmp/llama31_8b_dummy")
    ap.add_argument("--tokenizer-dir", default="/root/smollm2")
    ap.add_argument("--port", type=int, default=30021)
    ap.add_argument("--mem-fraction", type=float, default=0.85)
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    for name in args.configs:
        config_flags(name)  # fail on a bad name before anything starts
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on the GPU machine (nvidia-h100-x1)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summary = {"model": llama_config(**LLAMA31_8B), "device": torch.cuda.get_device_name(), "prompt_len": args.prompt_len}
    state = Path(args.e2e_json)
    e2e = json.loads(state.read_text()) if state.is_file() else {}
    if args.configs:
        check_plugin_installed()
        write_model_folder(args.model_dir, summary["model"], args.tokenizer_dir, "dummy")
        rng = random.Random(0)
        for name in args.configs:
            try:
                e2e[name] = measure(args, name, rng)
            except Exception as exc:  # a server that fails is reported; the others still run
                print(f"[8b] {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
                summary.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
                continue
            r = e2e[name]
            print(f"[8b] {name:11s} ready {r['ready_s']:.0f}s  prefill 32K {r['prefill_32k_s']:.3f}s  decode tok/s "
                  f"bs1 {r['decode_tok_s_bs1']:.1f}  bs8 {r['decode_tok_s_bs8']:.1f}  fallbacks {r['fallbacks']}", flush=True)
    state.write_text(json.dumps(e2e, indent=1))
    summary["e2e"] = e2e
    if args.attention_share:
        summary["kernels"] = share = attention_share(args, e2e)
        for phase, rows in share["per_layer_ms"].items():
            for kernel, ms in rows.items():
                print(f"[8b] kernel {phase:7s} {kernel:22s} {ms:8.3f} ms/layer  x{share['layers']} = {ms * share['layers']:9.1f} ms")
        for key, sp in share["sparsity"].items():
            print(f"[8b] synthetic-data sparsity {key}: {sp:.2f}")
        for name, s in share["attention_share"].items():
            print(f"[8b] attention share, {name}: " + ", ".join(f"{k} {v:.0%}" for k, v in s.items()))
        for name, p in share.get("projected_with_synthetic_sparsity", {}).items():
            print(f"[8b] projected {name} (blasst0 e2e, synthetic sparsity): " + ", ".join(f"{k} {v:.3f}" for k, v in p.items()))
    path = Path(args.out) / f"dummy_8b_long_{'_'.join(args.configs) or 'kernels'}.json"
    path.write_text(json.dumps(summary, indent=1))
    print(f"[8b] wrote {path}")
    return 1 if summary.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
