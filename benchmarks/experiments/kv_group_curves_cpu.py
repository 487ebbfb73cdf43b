"""CPU: the sensitivity measurements behind calibration issue #4's per-KV-group curves (NOTES,
"Per-KV-group KL curves"), on the same 2K window and grid as an existing version 4 calibration.

    OMP_NUM_THREADS=2 python benchmarks/experiments/kv_group_curves_cpu.py measure \\
        --calibration benchmarks/results/calibration_smollm2_budget4k_curves2k_cpu.json \\
        --out benchmarks/results/kv_group_curves_smollm2_calib2k_cpu.json
    python benchmarks/experiments/kv_group_curves_cpu.py build --calibration ... --curves ... \
        --out ... [--layer-point] [--group-curves] [--max-group-mass 0.1]

``measure``: each layer's KL at the grid factor nearest 0.3 mass (the point version 4 lacks) and
every KV group's KL curve (:func:`blasst_sglang.calibration.kv_group_sensitivity`, masses
3e-3 ... 0.3). ``build``: the input calibration with the layer curves extended by the 0.3 point
and/or the group curves added (version 5). The sweep is the input file's (``blasst calibrate
--lengths 4096 --texts 2`` reproduces it bit for bit), so ``--group-curves`` alone gives what
``blasst calibrate --lengths 4096 --texts 2 --kv-group-curves`` writes.
"""

import argparse
import json
import time

import torch


def measure(args):
    from blasst_sglang.calibration import (
        GROUP_SENSITIVITY_MASSES, kv_group_sensitivity, layer_sensitivity, load_calibration,
    )
    from blasst_sglang.model import load_smollm2

    calib = load_calibration(args.calibration)
    factors = calib.phases["prefill"].budget.factors
    model, tok = load_smollm2()
    out = {"calibration": args.calibration, "length": args.length, "factors": factors.tolist()}
    t = time.time()
    layer = layer_sensitivity(model, tok, factors, length=args.length, reference_mass=0.3, curve_masses=())
    out["layer_point_0.3"] = {k: layer[f"curve_{k}"][:, 0].tolist() for k in ("mass", "kl", "factor")}
    out["layer_seconds"] = time.time() - t
    t = time.time()
    group = kv_group_sensitivity(model, tok, factors, length=args.length, curve_masses=GROUP_SENSITIVITY_MASSES)
    out["group_masses"] = list(GROUP_SENSITIVITY_MASSES)
    out["group_curves"] = {k: group[f"curve_{k}"].tolist() for k in ("mass", "kl", "factor")}
    out["group_seconds"] = time.time() - t
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out} (layers {out['layer_seconds']:.0f} s, groups {out['group_seconds']:.0f} s)")


def build(args):
    from blasst_sglang.calibration import load_calibration

    raw = json.load(open(args.curves))
    keep = [i for i, m in enumerate(raw["group_masses"]) if args.max_group_mass is None or m <= args.max_group_mass]
    point = {k: torch.tensor(v, dtype=torch.float64)[:, None] for k, v in raw["layer_point_0.3"].items()}
    # A layer that cannot drop 0.1 got layer_sensitivity's stand-in point (factor 0): not a measurement.
    unmeasured = point["factor"] == 0
    point = {k: v.masked_fill(unmeasured, 0.0) for k, v in point.items()}
    group = {k: torch.tensor(raw["group_curves"][k], dtype=torch.float64)[..., keep] for k in ("mass", "kl")}
    calib = load_calibration(args.calibration)
    for ph in calib.phases.values():
        b = ph.budget
        if args.layer_point:
            b.layer_curve_mass = torch.cat([b.layer_curve_mass, point["mass"]], 1)
            b.layer_curve_kl = torch.cat([b.layer_curve_kl, point["kl"]], 1)
        if args.group_curves:
            b.group_curve_mass, b.group_curve_kl = group["mass"], group["kl"]
    calib.save(args.out)
    print(f"wrote {args.out} (version {calib.version})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(required=True)
    m = sub.add_parser("measure")
    m.add_argument("--calibration", required=True)
    m.add_argument("--length", type=int, default=2048)
    m.add_argument("--out", required=True)
    m.set_defaults(run=measure)
    b = sub.add_parser("build")
    b.add_argument("--calibration", required=True)
    b.add_argument("--curves", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--layer-point", action="store_true", help="add the 0.3 point to the layer curves")
    b.add_argument("--group-curves", action="store_true", help="add the KV group curves (version 5)")
    b.add_argument("--max-group-mass", type=float, default=None, help="drop group points aimed above this mass")
    b.set_defaults(run=build)
    args = p.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
