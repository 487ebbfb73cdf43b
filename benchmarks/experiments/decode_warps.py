"""Does the decode at ~70 % gain from 8 warps per program (issue #6, P4)?

Nsight Compute on the landed Gluon decode (``profile_skip_kernels.py``; H100, 16x64K and 128x8K p16,
``benchmarks/NOTES.md`` v16): dense reads at 86-90 % of DRAM peak, ~70 % skipped at 80-83 %, and the
SMs issue an instruction every ~2.6 cycles per scheduler with few warps eligible; a warp spends
~540 instructions per 64-key tile, two fifths of them address arithmetic for its 8 K and 8 V rows
of ``cp.async``. So the ~70 % decode is bound by each warp's per-tile chain, not by bytes in flight.
Prediction: 8 warps per program halve each warp's rows, S columns and P·V columns (124-128
registers: 2 CTAs and 16 warps per SM instead of 3 and 12), so a tile's chain is shorter: faster
at ~70-90 %, level dense. With 8 warps a third K stage fits (85 KB; capped at 128 registers, no
spill, still 2 CTAs per SM).

Measured (``results/experiments/decode_H100/decode_warps_v16.json``; that run rewrote the warp count
in the kernel's source, which ``gluon_decode(num_warps=8)`` now does): 8 warps dense 1.04x on 64x16K
p1 and 128x8K p16/p1, level on 16x64K and 32x32K; ~70 % 1.05 / 1.02 / 1.00 / 0.99 / 0.99x; ~90 %
0.94-0.97x; a third K stage lost 1-3 % more. The skip build's outputs and counters equal the 4-warp
kernel's (20/20); the dense build is not checked there (no factor). The API's choice since v17:
``gluon_decode.default_num_warps``.

Outputs and counters must equal the landed kernel's (same programs and rule). Timing as
``decode_launch_order.py``.

    bash benchmarks/gpu/run_bench.sh benchmarks/experiments/decode_warps.py --out $OUT
"""

from __future__ import annotations

import functools
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from decode_launch_order import LANDED, experiment_parser, run_experiment  # noqa: E402  (puts benchmarks/ on the path)

import blasst_kernels.gluon_decode as gd  # noqa: E402


def make_variants():
    """``{name: launch}``: 4 warps (the launch this experiment measured against) and 8 warps."""
    return {LANDED: functools.partial(gd.gluon_decode, num_warps=4),
            "8 warps": functools.partial(gd.gluon_decode, num_warps=8),
            "8 warps, 3 K stages": functools.partial(gd.gluon_decode, num_warps=8, num_k_stages=3)}


def main():
    run_experiment(make_variants(), "decode_warps", experiment_parser(__doc__).parse_args())


if __name__ == "__main__":
    main()
