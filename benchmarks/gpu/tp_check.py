#!/usr/bin/env python3
"""Tensor parallelism check: ``blasst`` vs ``triton`` on a Llama-shaped model served with ``--tp 2``.

2-GPU kind (nvidia-h200-x2), from the repo root:

    bash benchmarks/gpu/setup_gpu.sh && export PYTHONPATH=/opt/sgl-site
    python3 benchmarks/gpu/tp_check.py                  # tp_check_<arch>_tp<N>.json + server logs to $OUT
    python3 benchmarks/gpu/tp_check.py --weights dummy --configs triton blasst0
    python3 benchmarks/gpu/tp_check.py --arch mla --weights dummy --tp 1   # MLA (any kind): reaches our kernels?

Writes a model folder (``--model-dir``, default /tmp/tp_llama): a Llama config with 32 query / 8 KV
heads of dim 128 (hidden 1024, so the weights stay small), ``--layers`` layers, vocab 49152, and
SmolLM2's tokenizer files copied from ``--tokenizer-dir`` (/root/smollm2, made by setup_gpu.sh).
``--weights random`` (default) also writes seeded ``model.safetensors`` weights whose q/k scale
gives peaked attention and clear logit gaps; ``--weights dummy`` serves ``--load-format dummy``
(SGLang's uniform ±1e-3 weights: near-uniform attention, so nothing is skipped and logits nearly tie).
``--arch mla`` writes a small DeepSeek-V2-style config instead (MLA: KV LoRA rank 512, rope dim 64,
16 heads, dense MLPs; dummy weights only): SGLang runs its MLA path (absorbed decode, prefix
extend), and blasstS's sparsity lines show whether that path reaches BLASST's kernels.

Then for each config a ``python -m sglang.launch_server --tp 2`` (CUDA graphs off unless
``--cuda-graph``): ``triton``; ``blasst0`` (threshold scale 0 for both phases); ``blasstS``
(scale ``--scale`` for both phases, ``--blasst-stats 1``). Each gets the same greedy batch
(random token ids of ``--prompt-lens``, fixed seed, ``--new-tokens`` each, top-2 logprobs).
Prints a table: per prompt, whether the tokens equal triton's, the common prefix, and triton's
top-2 logprob gap where they part (a near-tie explains a split). Also each rank's
"BLASST attention backend" line (heads 0..15 / 16..31 of 32) and last sparsity line, and any
fallback. Exit status 0 when ``blasst0`` matches triton on every prompt, or parts only at
near-ties (gap < ``--tie-gap``), and every server answered.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serve_check import check_plugin_installed, http_json, server  # noqa: E402

#: Files of a Hugging Face tokenizer folder worth copying (those present are copied).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja")


def llama_config(**overrides) -> dict:
    """A Hugging Face ``LlamaForCausalLM`` config; ``overrides`` replace keys."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 49152, "max_position_embeddings": 16384, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    }
    config.update(overrides)
    return config


def deepseek_mla_config(**overrides) -> dict:
    """A small DeepSeek-V2-style config (MLA: KV rank 512, rope dim 64, no query LoRA, dense MLPs):
    SGLang serves it with MLA attention (absorbed decode, prefix extend); ``overrides`` replace keys."""
    layers = overrides.get("num_hidden_layers", 4)
    config = {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_act": "silu",
        "hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 512, "num_hidden_layers": layers,
        "num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 512, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        # Routed experts exist in the config but every layer is dense (first_k_dense_replace = layers).
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": layers,
        "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
        "routed_scaling_factor": 1.0, "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True,
        "vocab_size": 49152, "max_position_embeddings": 16384, "rope_theta": 10000.0, "rope_scaling": None,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
        "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    }
    config.update(overrides)
    return config


def random_weights(config: dict, seed: int, qk_std: float, device: str):
    """Seeded bf16 weights under Hugging Face Llama names: unit embeddings and norms, q/k of std
    ``qk_std`` (attention scores of std about ``(qk_std * sqrt(hidden))**2``), the rest 1/sqrt(fan_in)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    h, inter, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    hq, hkv, vocab = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]

    def normal(rows, cols, std):
        return (torch.randn(rows, cols, generator=gen, device=device) * std).to(torch.bfloat16).cpu()

    weights = {
        "model.embed_tokens.weight": normal(vocab, h, 1.0),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
        "lm_head.weight": normal(vocab, h, 3 * h ** -0.5),  # logits of std ~3: clear greedy choices
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": normal(hq * d, h, qk_std),
            p + "self_attn.k_proj.weight": normal(hkv * d, h, qk_std),
            p + "self_attn.v_proj.weight": normal(hkv * d, h, h ** -0.5),
            p + "self_attn.o_proj.weight": normal(h, hq * d, (hq * d) ** -0.5),
            p + "mlp.gate_proj.weight": normal(inter, h, h ** -0.5),
            p + "mlp.up_proj.weight": normal(inter, h, h ** -0.5),
            p + "mlp.down_proj.weight": normal(h, inter, inter ** -0.5),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        })
    return weights


def write_model_folder(path, config: dict, tokenizer_dir, weights: str = "dummy", seed: int = 0,
                       qk_std: float = 0.05, device: str = "cpu") -> Path:
    """``config.json`` + the tokenizer files of ``tokenizer_dir`` (+ ``model.safetensors`` when
    ``weights == "random"``) in ``path``; returns it. Serve a ``"dummy"`` folder with ``--load-format dummy``."""
    path = Path(path)
    tokenizer_dir = Path(tokenizer_dir)
    copied = [name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if "tokenizer_config.json" not in copied:
        raise FileNotFoundError(f"no tokenizer in {tokenizer_dir} (run benchmarks/gpu/setup_gpu.sh first)")
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    for name in copied:
        shutil.copy(tokenizer_dir / name, path / name)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    if weights == "random":
        from safetensors.torch import save_file

        save_file(random_weights(config, seed, qk_std, device), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def random_prompts(lens, vocab: int, seed: int):
    """Token-id prompts of the given lengths (ids 100.. to stay clear of special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(n)] for n in lens]


def top2_gaps(meta: dict):
    """Per output token: top-1 minus top-2 logprob (``None`` where SGLang gave fewer than 2)."""
    gaps = []
    for entry in meta.get("output_top_logprobs") or []:
        vals = sorted((t[0] for t in entry or [] if t and t[0] is not None), reverse=True)
        gaps.append(vals[0] - vals[1] if len(vals) > 1 else None)
    return gaps


def log_lines(text: str, key: str):
    return [line.strip() for line in text.splitlines() if key in line]


def run_config(args, name: str, backend: str, flags, prompts):
    """Serve with ``backend`` + ``flags``, greedy-generate for ``prompts``; returns tokens, gaps, log lines."""
    log = Path(args.out) / f"tp_server_{args.arch}_tp{args.tp}_{name}.log"
    extra = ["--tp-size", str(args.tp), "--random-seed", str(args.seed), *flags]
    if args.weights == "dummy":
        extra += ["--load-format", "dummy"]
    if not args.cuda_graph:
        extra.append("--disable-cuda-graph")
    if not args.custom_all_reduce:
        extra.append("--disable-custom-all-reduce")
    t0 = time.time()
    with server(args, backend, extra, log) as base:
        ready = time.time() - t0
        t1 = time.time()
        outs = http_json(base + "/generate", {
            "input_ids": prompts, "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": {"temperature": 0, "max_new_tokens": args.new_tokens, "ignore_eos": True},
        })
        seconds = time.time() - t1
    text = log.read_text(errors="replace")
    return {
        "name": name, "backend": backend, "flags": flags, "ready_s": round(ready, 1), "generate_s": round(seconds, 3),
        "output_ids": [o["output_ids"] for o in outs], "top2_gaps": [top2_gaps(o["meta_info"]) for o in outs],
        "backend_lines": log_lines(text, "BLASST attention backend"),
        "sparsity_lines": log_lines(text, "BLASST sparsity"),
        "fallback_lines": sorted(set(log_lines(text, "BLASST:"))),
    }


def compare(ref: dict, got: dict, tie_gap: float):
    """Per prompt: equal tokens, common prefix, triton's top-2 gap where they part, and whether that is a near-tie."""
    rows = []
    for ids_ref, ids_got, gaps in zip(ref["output_ids"], got["output_ids"], ref["top2_gaps"]):
        common = next((i for i, (a, b) in enumerate(zip(ids_ref, ids_got)) if a != b), min(len(ids_ref), len(ids_got)))
        equal = ids_ref == ids_got
        gap = None if equal or common >= len(gaps) else gaps[common]
        rows.append({"equal": equal, "common_prefix": common, "n": len(ids_ref), "gap_at_split": gap,
                     "near_tie": gap is not None and gap < tie_gap})
    return rows


def configs(args):
    scale = f"{args.scale:g}"
    return {
        "triton": ("triton", []),
        "blasst0": ("blasst", ["--blasst-prefill-threshold-scale", "0", "--blasst-decode-threshold-scale", "0"]),
        "blasstS": ("blasst", ["--blasst-prefill-threshold-scale", scale, "--blasst-decode-threshold-scale", scale,
                               "--blasst-stats", "1"]),
    }


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["triton", "blasst0", "blasstS"], choices=["triton", "blasst0", "blasstS"])
    ap.add_argument("--scale", type=float, default=64.0, help="threshold scale factor of blasstS, both phases")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--arch", choices=["llama", "mla"], default="llama",
                    help="llama: 32/8 heads of dim 128; mla: a small DeepSeek-V2-style MLA model (--weights dummy only)")
    ap.add_argument("--weights", choices=["random", "dummy"], default="random")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--qk-std", type=float, default=0.05, help="std of the random q/k weights (attention sharpness)")
    ap.add_argument("--prompt-lens", nargs="+", type=int, default=[200, 1000, 2500, 5000])
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tie-gap", type=float, default=0.07,
                    help="top-2 logprob gap (nats) below which a split is a near-tie (default: one bf16 step of a logit of 8-16)")
    ap.add_argument("--model-dir", default="/tmp/tp_llama")
    ap.add_argument("--tokenizer-dir", default="/root/smollm2")
    ap.add_argument("--cuda-graph", action="store_true", help="keep CUDA graphs on (off by default: faster start)")
    ap.add_argument("--custom-all-reduce", action="store_true", help="use sgl-kernel's custom all-reduce (default: NCCL only)")
    ap.add_argument("--port", type=int, default=30019)
    ap.add_argument("--mem-fraction", type=float, default=0.5)
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if args.arch == "mla" and args.weights != "dummy":
        ap.error("--arch mla needs --weights dummy (random weights are written under Llama names only)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if torch.cuda.device_count() < args.tp:
        sys.exit(f"tp_check needs {args.tp} GPUs, this machine has {torch.cuda.device_count()}: "
                 "run it on the 2-GPU kind (nvidia-h200-x2)")
    check_plugin_installed()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    config = (llama_config if args.arch == "llama" else deepseek_mla_config)(num_hidden_layers=args.layers)
    write_model_folder(args.model_dir, config, args.tokenizer_dir, args.weights, args.seed, args.qk_std, "cuda")
    prompts = random_prompts(args.prompt_lens, config["vocab_size"], args.seed)
    all_configs = configs(args)
    results = {}
    for name in args.configs:
        backend, flags = all_configs[name]
        try:
            results[name] = run_config(args, name, backend, flags, prompts)
        except Exception as exc:  # a server that fails is reported; the others still run
            results[name] = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
        print(f"[tp] {name}: {results[name].get('error') or 'ready %.0fs, generate %.2fs' % (results[name]['ready_s'], results[name]['generate_s'])}", flush=True)

    ok = all("error" not in r for r in results.values())
    comparisons = {}
    if "triton" in results and "error" not in results["triton"]:
        ref = results["triton"]
        print(f"\n[tp] vs triton, {args.new_tokens} new tokens per prompt (tie: top-2 gap < {args.tie_gap} nats)")
        print(f"{'config':8s} {'prompt':>7s} {'equal':>6s} {'prefix':>7s} {'gap':>8s}")
        for name, res in results.items():
            if name == "triton" or "error" in res:
                continue
            comparisons[name] = compare(ref, res, args.tie_gap)
            for n, row in zip(args.prompt_lens, comparisons[name]):
                gap = "-" if row["gap_at_split"] is None else f"{row['gap_at_split']:.3f}"
                print(f"{name:8s} {n:7d} {str(row['equal']):>6s} {row['common_prefix']:4d}/{row['n']:<2d} {gap:>8s}")
        if "blasst0" in comparisons:
            ok = ok and all(r["equal"] or r["near_tie"] for r in comparisons["blasst0"])
    for name, res in results.items():
        for key in ("backend_lines", "sparsity_lines", "fallback_lines"):
            lines = res.get(key) or []
            for line in (lines if key != "sparsity_lines" else lines[-args.tp:]):
                print(f"[tp] {name} {line[-300:]}")
    summary = {"arch": args.arch, "config": config, "weights": args.weights, "tp": args.tp, "prompt_lens": args.prompt_lens,
               "device": torch.cuda.get_device_name(), "ok": ok, "comparisons": comparisons, "results": results}
    path = Path(args.out) / f"tp_check_{args.arch}_tp{args.tp}.json"
    path.write_text(json.dumps(summary, indent=1))
    print(f"[tp] {'PASS' if ok else 'FAIL'}; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
