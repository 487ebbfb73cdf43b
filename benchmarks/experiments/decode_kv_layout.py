"""Is the decode at ~70 % held back by where K and V sit in memory (issue #6, P4)?

SGLang's KV buffers are token-major, ``(slots, Hkv, D)``: one token's K rows of the 8 KV heads are
one 2 KB row, and a decode program (one KV head) reads a 256-byte slice of each. Dense, the eight
programs of a (request, split) start together and run at the same pace, so they read the same
2 KB rows close in time. Skipping, they keep 3-100 % of their V tiles each
(``decode_head_imbalance_cpu.py``), drift apart, and each 256-byte read may open a DRAM row that
its neighbours' reads no longer share. Prediction, if that costs: the same kernel on a head-major
copy of the same K/V (``(Hkv, slots, D)`` seen through strides as ``(slots, Hkv, D)``: a tile of
one head is 64 contiguous 256-byte rows when its slots are) is level dense and faster at ~70-90 %.

Same kernel, same inputs, same decisions: outputs and counters must equal the landed layout's.
Timing as ``decode_launch_order.py`` (CUDA-graph replays, the landed split rule, the API's grid).

    bash benchmarks/gpu/run_bench.sh benchmarks/experiments/decode_kv_layout.py --out $OUT
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from decode_launch_order import LANDED, LastSeen, experiment_parser, run_experiment  # noqa: E402  (puts benchmarks/ on the path)

import blasst_kernels.gluon_decode as gd  # noqa: E402

HEAD_MAJOR = "head-major K/V"


def make_variants():
    """``{name: launch}``: the landed decode on SGLang's token-major buffers, and on head-major
    copies of them (made once per buffer pair, outside any graph capture, and kept for the last
    pair: :class:`decode_launch_order.LastSeen`)."""
    copies = LastSeen()

    def head_major(q, kb, vb, *args, **kw):
        kb_hm, vb_hm = copies.get((kb, vb), lambda: tuple(x.permute(1, 0, 2).contiguous().permute(1, 0, 2)
                                                          for x in (kb, vb)))
        gd.gluon_decode(q, kb_hm, vb_hm, *args, **kw)

    return {LANDED: gd.gluon_decode, HEAD_MAJOR: head_major}


def main():
    run_experiment(make_variants(), "decode_kv_layout", experiment_parser(__doc__).parse_args())


if __name__ == "__main__":
    main()
