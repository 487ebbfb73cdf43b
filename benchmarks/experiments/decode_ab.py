"""A/B on the GPU: the Gluon decode in ``kernels/`` against an earlier copy of it (``--old PATH``,
e.g. ``git show c0f9b88:kernels/gluon_decode.py > old_gluon_decode.py``, an untracked file that
travels to the GPU machine), at 4 and 8 warps.

Both run the same programs and the same skip rule, so outputs must agree (to rounding: the two may
sum a row in another order) and skip counters must be equal; each P4 shape checks that dense and at ~70 % and
~90 %, then times every kernel dense and at those factors (CUDA-graph replays, the 4-warp split rule),
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

from decode_launch_order import LastSeen, experiment_parser, run_experiment  # noqa: E402  (puts benchmarks/ on the path)

import blasst_kernels.gluon_decode as gd  # noqa: E402
from blasst_kernels.api import LONG_SPLIT_TILES, default_num_kv_splits  # noqa: E402


OLD = "old"


def load_old(path):
    """``path`` imported inside the package (it has relative imports)."""
    spec = importlib.util.spec_from_file_location("blasst_kernels._gluon_decode_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def eight_warps_own_waves(mod=gd, long_tiles=LONG_SPLIT_TILES):
    """``mod``'s kernel (a ``gluon_decode`` module) at 8 warps with the split rule's waves counted
    in 8-warp programs (two per SM, not three), so its programs make whole 8-warp waves: at 1x128K
    64 splits (two waves) instead of 48 (1.45; v17: 8 warps ran 0.89-0.93x there under the 4-warp
    rule), at 16x64K 4 instead of 6. ``long_tiles``:
    the shortest chunk, in tiles, for a second wave (the API's since v19:
    ``gluon_decode.SECOND_WAVE_TILES[8]``, 64). Timing only (marked ``own_splits``: other splits,
    other seeds, other decisions)."""
    cache = LastSeen()

    def launch(q, k_buffer, v_buffer, out, part_o, part_lse, indptr, indices, splits, max_splits, *args, **kw):
        def make():
            return default_num_kv_splits(indptr[1:] - indptr[:-1], k_buffer.shape[1] * kw["tiles_per_group"],
                                         gd.BLOCK_N, max_splits, programs_per_sm=gd.CTAS_PER_SM[8],
                                         long_split_tiles=long_tiles)

        own = cache.get((indptr,), make)
        mod.gluon_decode(q, k_buffer, v_buffer, out, part_o, part_lse, indptr, indices, own, max_splits, *args,
                         num_warps=8, **kw)

    launch.own_splits = True
    return launch


def make_variants(old):
    """``{name: launch}``: the old copy (its default, named as the baseline) and the kernel in
    ``kernels/``, each at its default launch for given splits, at 4 and 8 warps, and as
    ``decode_attention`` runs it on its own splits (8 warps, waves of 8-warp programs, a second wave
    from 64-tile chunks: v19)."""
    return {OLD: old.gluon_decode, "old, 4 warps": functools.partial(old.gluon_decode, num_warps=4),
            "old, 8 warps": functools.partial(old.gluon_decode, num_warps=8),
            "old, own splits": eight_warps_own_waves(old, 64),
            "new": gd.gluon_decode, "new, 4 warps": functools.partial(gd.gluon_decode, num_warps=4),
            "new, 8 warps": functools.partial(gd.gluon_decode, num_warps=8),
            "new, own splits": eight_warps_own_waves(gd, 64)}


def main():
    ap = experiment_parser(__doc__)
    ap.add_argument("--old", required=True, help="path of the earlier gluon_decode.py")
    args = ap.parse_args()
    run_experiment(make_variants(load_old(args.old)), "decode_ab", args, base=OLD)


if __name__ == "__main__":
    main()
