#!/usr/bin/env python3
"""SGLang's own attention-backend test kit, run for the ``blasst`` backend (and ``triton`` as control).

GPU (any one-GPU kind, e.g. nvidia-h100-x1), from the repo root:

    bash benchmarks/gpu/setup_gpu.sh && export PYTHONPATH=/opt/sgl-site
    python3 benchmarks/gpu/sglang_kit_check.py                      # JSON to $OUT/sglang_kit_check.json
    python3 benchmarks/gpu/sglang_kit_check.py --scale 0 --head-dims 64 128 --modes eager

CPU dry run (Triton's interpreter; slow, so a few cases):

    TRITON_INTERPRET=1 python3 benchmarks/gpu/sglang_kit_check.py --device cpu --dtype float32 \
        --modes eager --head-dims 64 --cases page_boundary

``blasst_sglang.plugin.register()`` is called first (as SGLang's plugin entry point would), then
every case of ``sglang.test.kits.attention_unittest`` that fits the backend is built through
``ATTENTION_BACKENDS[name]`` and checked against the kit's float reference with the kit's
tolerances: the dense cases (``make_dense_cases``) eagerly, their decode cases through the kit's
CUDA-graph decode runner (capture/replay metadata), their extend cases through its piecewise
split-op runner, and the MLA cases (``make_mla_cases``). Head dims 16 (the kit's default; BLASST
falls back to SGLang's dense kernel there) and BLASST's 64 / 128; MLA at the kit's rank 32 (fallback)
and DeepSeek's 512 + 64 (BLASST's absorbed kernels). BLASST runs with threshold scale ``--scale``
for both phases (0 = dense: must pass like triton) and skip counters on, so each case also reports
the tiles BLASST's kernels visited and any fallback. Exit status 0 when every blasst case passed
that triton passed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
import unittest
from collections import Counter
from pathlib import Path

import torch

MODES = ("eager", "cuda_graph_decode", "split_op", "mla")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", nargs="+", default=["triton", "blasst"])
    ap.add_argument("--scale", type=float, default=0.0, help="BLASST threshold scale factor, both phases (0 = dense)")
    ap.add_argument("--head-dims", nargs="+", type=int, default=[16, 64, 128])
    ap.add_argument("--mla-dims", nargs="+", default=["32:0", "512:64"], help="MLA kv_lora_rank:qk_rope_head_dim pairs")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--cases", default="", help="only cases whose name contains this")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    return ap.parse_args(argv)


def setup(args):
    """Register the plugin, configure BLASST, patch the kit's mock model configs; returns (kits, created backends)."""
    from blasst_sglang import plugin
    from blasst_sglang.config import configure

    plugin.register()
    configure(prefill_threshold_scale=args.scale, decode_threshold_scale=args.scale, stats_interval=10**9)

    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.test.kits.attention_unittest.attention_methods import dense_attention, mla_attention

    # SGLang's ModelConfig has num_attention_layers; the kit's one-layer mocks do not.
    dense_attention.TinyModelConfig.num_attention_layers = 1
    mla_attention.TinyMLAModelConfig.num_attention_layers = 1
    created = []
    factory = ATTENTION_BACKENDS[plugin.BACKEND_NAME]

    def recording_factory(runner):
        backend = factory(runner)
        created.append(backend)
        return backend

    ATTENTION_BACKENDS[plugin.BACKEND_NAME] = recording_factory
    kits = dict(dense=dense_attention, mla=mla_attention)
    # The runner modes import every attention method's kit (sgl_kernel ops among them): one that
    # cannot be imported here is reported, and the other modes still run.
    for key, name in (("graph", "cuda_graph_decode_runner"), ("split", "split_op_runner")):
        try:
            kits[key] = importlib.import_module(f"sglang.test.kits.attention_unittest.runner_modes.{name}")
        except Exception as exc:  # reported per mode
            kits[key] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    return kits, created


def jobs(args, kits):
    """``(mode, label, case_fn, call)`` for every check; ``case_fn(backend)`` gives the kit case, ``call(case)`` runs it."""
    dense, mla, graph, split = kits["dense"], kits["mla"], kits["graph"], kits["split"]
    dtype = getattr(torch, args.dtype)
    common = dict(dtype=dtype, device=args.device)
    out = []

    def need(kit):
        if isinstance(kit, str):
            raise RuntimeError(f"runner mode not importable: {kit}")
        return kit

    def dense_cases(pred):
        return lambda backend: [c for c in dense.make_dense_cases(backend) if pred(c)]

    for hd in args.head_dims:
        if "eager" in args.modes:
            out.append(("eager", f"d{hd}", dense_cases(lambda c: True),
                        lambda tc, c, hd=hd: dense.run_dense_attention_case(tc, c, head_dim=hd, **common)))
        if "cuda_graph_decode" in args.modes:
            out.append(("cuda_graph_decode", f"d{hd}", dense_cases(lambda c: c.forward_mode.is_decode()),
                        lambda tc, c, hd=hd: need(graph).run_dense_cuda_graph_decode_case(tc, c, head_dim=hd, **common)))
        if "split_op" in args.modes:
            out.append(("split_op", f"d{hd}", dense_cases(lambda c: not c.forward_mode.is_decode()),
                        lambda tc, c, hd=hd: need(split).run_dense_split_op_extend_case(tc, c, breakable=False, head_dim=hd, **common)))
    if "mla" in args.modes:
        for dims in args.mla_dims:
            rank, rope = (int(x) for x in dims.split(":"))
            out.append(("mla", f"r{rank}+{rope}", mla.make_mla_cases,
                        lambda tc, c, r=rank, p=rope: mla.run_mla_attention_case(
                            tc, c, kv_lora_rank=r, qk_rope_head_dim=p, **common)))
    return out


def run_one(call, case, created):
    """Run one kit case; returns a result dict (status passed / failed / skipped, BLASST's tiles and fallbacks)."""
    created.clear()
    t0 = time.time()
    res = {"status": "passed", "error": None}
    try:
        call(unittest.TestCase(), case)
    except unittest.SkipTest as exc:
        res.update(status="skipped", error=str(exc))
    except Exception as exc:  # any failure of the case is reported, the run goes on
        res.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000], traceback=traceback.format_exc()[-4000:])
    res["seconds"] = round(time.time() - t0, 3)
    if created:
        res["fallbacks"] = dict(sum((b.fallbacks for b in created), Counter()))
        visited = skipped = 0
        for b in created:
            report = b.sparsity_report()
            visited += int(report.visited.sum())
            skipped += int(report.skipped.sum())
        res["tiles_visited"], res["tiles_skipped"] = visited, skipped
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on the GPU machine (or --device cpu with TRITON_INTERPRET=1)")
    from sglang.srt.runtime_context import get_parallel

    kits, created = setup(args)
    results = []
    with get_parallel().override(attn_tp_rank=0):
        for mode, label, case_fn, call in jobs(args, kits):
            for backend in args.backends:
                for case in case_fn(backend):
                    if args.cases not in case.name:
                        continue
                    res = {"mode": mode, "dims": label, "case": case.name, "backend": backend,
                           **run_one(call, case, created)}
                    results.append(res)
                    extra = "" if backend != "blasst" or "fallbacks" not in res else (
                        f" visited={res['tiles_visited']} skipped={res['tiles_skipped']} fallbacks={res['fallbacks']}")
                    print(f"[kit] {mode:17s} {label:8s} {backend:7s} {case.name:42s} {res['status']}{extra}"
                          + (f"  {res['error'].splitlines()[0][:200]}" if res["error"] else ""), flush=True)

    passed = {(r["mode"], r["dims"], r["case"]) for r in results if r["backend"] == "triton" and r["status"] == "passed"}
    regressions = [r for r in results if r["backend"] == "blasst" and r["status"] != "passed"
                   and ((r["mode"], r["dims"], r["case"]) in passed or "triton" not in args.backends)]
    summary = {b: {s: sum(r["backend"] == b and r["status"] == s for r in results) for s in ("passed", "failed", "skipped")}
               for b in args.backends}
    print(f"[kit] summary {summary}; blasst failures where triton passed: {len(regressions)}")
    for r in regressions:
        print(f"[kit] FAIL {r['mode']} {r['dims']} {r['case']}: {r['error']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "sglang_kit_check.json"
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
            "dtype": args.dtype, "scale": args.scale, "torch": torch.__version__}
    path.write_text(json.dumps({"meta": meta, "summary": summary, "regressions": len(regressions),
                                "results": results}, indent=1))
    print(f"[kit] wrote {path}")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
