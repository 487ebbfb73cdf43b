"""A/B on the GPU: the Gluon decode in ``kernels/`` against an earlier copy of it (``--old PATH``,
e.g. ``git show c0f9b88:kernels/gluon_decode.py > old_gluon_decode.py``, an untracked file that
travels to the GPU machine), at 4 and 8 warps.

Both run the same programs and the same skip rule, so outputs must agree (to rounding: the two may
sum a row in another order) and skip counters must be equal; each P4 shape checks that dense and at ~70 % and
~90 %, then times every kernel dense and at those factors (CUDA-graph replays, the landed split rule),
as ``decode_launch_order.py``. The table's baseline is the old copy at its default launch.

    bash benchmarks/gpu/run_bench.sh benchmarks/experiments/decode_ab.py --old old_gluon_decode.py --out $OUT
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from decode_launch_order import experiment_parser, run_experiment  # noqa: E402  (puts benchmarks/ on the path)

import blasst_kernels.gluon_decode as gd  # noqa: E402


OLD = "old"


def load_old(path):
    """``path`` imported inside the package (it has relative imports)."""
    spec = importlib.util.spec_from_file_location("blasst_kernels._gluon_decode_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_variants(old):
    """``{name: launch}``: the old copy (its default, 4 warps, named as the baseline), and the
    kernel in ``kernels/`` at its default and at 4 and 8 warps."""
    return {OLD: old.gluon_decode, "old, 8 warps": functools.partial(old.gluon_decode, num_warps=8),
            "new": gd.gluon_decode, "new, 4 warps": functools.partial(gd.gluon_decode, num_warps=4),
            "new, 8 warps": functools.partial(gd.gluon_decode, num_warps=8)}


def main():
    ap = experiment_parser(__doc__)
    ap.add_argument("--old", required=True, help="path of the earlier gluon_decode.py")
    args = ap.parse_args()
    run_experiment(make_variants(load_old(args.old)), "decode_ab", args, base=OLD)


if __name__ == "__main__":
    main()
