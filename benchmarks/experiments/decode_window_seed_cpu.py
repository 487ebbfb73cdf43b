"""CPU: would decode gain from the local window seen first, as prefill did in v11? (issue #4)

Decode decides each tile against ``max(m, seed)``; the reference's seed was tile 0's max (the
sink) for splits after the first, nothing for the first (``sink`` here). Prefill gained 2-3x less KL at equal sparsity
from visiting its diagonal tiles first (``benchmarks/NOTES.md``, v11). The decode analogue counts
the sequence's last tile (the query's own recent keys) as seen too. This measures, on SmolLM2
(one essay window of ``--length`` tokens, the last ``--steps`` positions as decode steps, as the
calibration does; one split, 64-key tiles), the sparsity and the dense softmax mass in skipped
tiles (the calibration's error proxy) over a factor grid, for both seeds. Since v11 the reference
and kernels use the window seed (``sink+window``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/decode_window_seed_cpu.py \\
        --out benchmarks/results/decode_window_seed_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import blasst_kernels.reference as ref
    from blasst_kernels.reference import TileState, decode_skip_sweep
    from blasst_sglang.calibration import calibration_windows, capture_qk, model_shape
    from blasst_sglang.model import load_smollm2

    model, tok = load_smollm2()
    num_layers = model_shape(model)[0]
    ids = calibration_windows(tok, args.length, 1)[0]
    L, steps, bn = ids.shape[1], args.steps, args.block_n
    captured = {}

    def on_attention(layer, q, k):
        captured[layer] = (q[-steps:].clone(), k.clone())

    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    with capture_qk(model, on_attention), torch.inference_mode():
        base(input_ids=ids, use_cache=False)

    factors = torch.logspace(math.log(1.0), math.log(3000.0), 16, base=math.e, dtype=torch.float64)
    window_seed = ref._decode_seed  # the product's: the last tile, and tile 0 after the first split

    def sink_seed(q_rs, k, row_kv_head, ns, block_n, sm_scale):
        """Before v11: tile 0's max for splits after the first, nothing for the first."""
        k0 = k[:block_n].permute(1, 0, 2).to(q_rs.dtype)[row_kv_head]
        seed = torch.einsum("rpd,rnd->rpn", q_rs, k0).amax(-1) * sm_scale
        first = torch.arange(q_rs.shape[0]) % ns == 0
        return seed.masked_fill(first[:, None], -math.inf)

    seeds = {"sink": sink_seed, "sink+window": window_seed}
    SK, UV = int(TileState.SKIPPED), int(TileState.UNVISITED)
    skipped = {s: torch.zeros(len(factors), dtype=torch.float64) for s in seeds}
    mass = {s: torch.zeros(len(factors), dtype=torch.float64) for s in seeds}
    visited, rows = 0.0, 0.0
    try:
        for layer in range(num_layers):
            q_all, k_all = captured[layer]
            for step in range(steps):
                pos = L - steps + step
                lams = torch.log(factors) - math.log(pos + 1)
                lams = lams.masked_fill(lams >= 0, -math.inf)
                for name, fn in seeds.items():
                    ref._decode_seed = fn
                    maps, m = decode_skip_sweep(q_all[step], k_all[: pos + 1], lams, block_n=bn, num_splits=1,
                                                return_skipped_mass=True)
                    skipped[name] += (maps == SK).flatten(1).sum(-1).double()
                    mass[name] += m.double().sum(-1)
                    if name == "sink":
                        visited += float((maps[0] != UV).sum())
                        rows += m.shape[-1]
            print(f"layer {layer} done", flush=True)
    finally:
        ref._decode_seed = window_seed
    out = {"what": __doc__.split("\n\n")[0], "length": L, "steps": steps, "block_n": bn, "num_splits": 1,
           "factors": factors.tolist(),
           "results": {s: {"sparsity": (skipped[s] / visited).tolist(), "mass": (mass[s] / rows).tolist()} for s in seeds}}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print("factor   sink: sparsity / mass   sink+window: sparsity / mass")
    for i, fct in enumerate(factors.tolist()):
        a, b = out["results"]["sink"], out["results"]["sink+window"]
        print(f"{fct:8.1f}   {a['sparsity'][i]:.3f} / {a['mass'][i]:.2e}   {b['sparsity'][i]:.3f} / {b['mass'][i]:.2e}")


if __name__ == "__main__":
    main()
