"""Public entry points of the BLASST kernels: validation, defaults, dispatch.

Layouts follow SGLang's triton backend. A batch of ``B`` sequences is ragged:

- ``qo_indptr`` ``(B + 1,)`` int32/int64: new tokens of sequence ``b`` are rows ``qo_indptr[b]:qo_indptr[b+1]``
  of ``q``/``k``/``v``;
- ``kv_indptr`` ``(B + 1,)`` int32/int64 and ``kv_indices`` ``(nnz,)`` int32/int64: the KV of sequence ``b``
  (its cached prefix for extend, its whole context for decode) is the token slots
  ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` of ``k_buffer``/``v_buffer`` ``(slots, Hkv, D)``. Pages of
  ``page_size`` tokens are runs of consecutive slots, as SGLang's triton backend lays them out.

``threshold_scale_factor`` (FlashInfer's name): ``λ = factor / kv_len`` per sequence; ``None`` or ``0``
is dense; a float or one float per query head. A float32 CUDA tensor ``(Hq,)`` is used as is, with
no host sync, so CUDA graphs can capture the call. See :mod:`blasst_kernels.threshold`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from .reference import decode_head_blocks
from .threshold import ScaleFactor, validate_scale_factor

__all__ = [
    "KernelOptions",
    "default_options",
    "extend_attention",
    "prefill_attention",
    "decode_attention",
    "DecodeSplits",
    "plan_decode_splits",
    "default_num_kv_splits",
    "workspace_kv_splits",
    "SUPPORTED_HEAD_DIMS",
]

#: (qk head dim, v head dim) pairs the kernels support. 192/128 and 576/512 are MLA's prefill (MHA
#: form) and absorbed form: the last 64 dims of q/k are the rope part.
SUPPORTED_HEAD_DIMS = ((64, 64), (128, 128), (256, 256), (192, 128), (576, 512))
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class KernelOptions:
    """Tile sizes and launch knobs. ``block_m``/``block_n`` also define the skip granularity.

    ``block_m`` is ignored by decode (its rows are the heads of a KV group). ``kernel`` picks the
    implementation: ``"auto"`` runs a Gluon kernel for sm_90 where one applies — prefill: the
    warp-specialised :mod:`blasst_kernels.gluon_prefill` (fp16/bf16, head dim 128, 64 x 128 tiles,
    causal, no skip map; a paged prefix is gathered into a contiguous copy first); decode:
    :mod:`blasst_kernels.gluon_decode` (fp16/bf16, head dim 64 or 128, 64-key tiles, at most 16
    query heads per KV head, no skip map) — and the Triton kernel otherwise;
    ``"triton"`` always runs Triton. Both make the same decisions (same tiles, same rule), so
    ``num_warps``/``num_stages``, Triton's knobs, change speed only.

    ``expected_sparsity`` (in [0, 1], or ``None``: unknown) is the fraction of tiles the caller
    expects skipped, e.g. a calibration's prediction for one layer. It changes speed only: below
    ``gluon_prefill.SPECULATE_BELOW`` (0.25) the Gluon prefill computes a tile's exponentials while
    its skip decision is still being voted, which costs nothing when the tile is kept and is
    wasted when it is skipped (H100: 0.99-1.00x dense speed with nothing skipped, against
    0.90-0.94x; 15-17 % slower at ~70 %). The Triton kernels and the decode ignore it.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    kernel: str = "auto"
    expected_sparsity: Optional[float] = None

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.kernel not in ("auto", "triton"):
            raise ValueError(f"kernel must be 'auto' or 'triton', got {self.kernel!r}")
        e = self.expected_sparsity
        if e is not None and (isinstance(e, bool) or not (isinstance(e, (int, float)) and 0.0 <= e <= 1.0)):
            raise ValueError(f"expected_sparsity must be None or in [0, 1], got {e!r}")


def default_options(head_dim: int, head_dim_v: int, phase: str) -> KernelOptions:
    """Defaults by shape only (never by device), so CPU skip maps match the GPU kernels'."""
    if phase == "decode":
        # 64-key tiles: the Gluon kernel's (sm_90, d <= 128: copy bandwidth dense, 1.46-1.51x it at
        # ~76 % skipped on the H100), and the calibration's default decode tile. The Triton kernel
        # (other GPUs, d = 256, skip maps) decides the same; at d = 128 it reads 0.84-0.98x copy
        # bandwidth dense with these tiles (0.96-1.00x with 128-key ones).
        return KernelOptions(16, 32 if head_dim > 256 else 64, num_warps=4, num_stages=3)
    if head_dim > 256:
        return KernelOptions(32, 32, num_warps=4, num_stages=1)
    if head_dim > 128:
        return KernelOptions(64, 64, num_warps=8, num_stages=2)
    if head_dim > 64:
        # 64 x 128: the Gluon kernel's tiles (one 64-row decision per consumer warpgroup), so the
        # Triton kernel (prefixes, other GPUs) decides the same way.
        return KernelOptions(64, 128, num_warps=4, num_stages=2)
    # d=64: 64x64 tiles cost 3 % of dense speed against 128x64 on the H100 but skip more at the same
    # threshold, and match the tile size the SmolLM2 accuracy numbers were measured with.
    return KernelOptions(64, 64, num_warps=4, num_stages=3)


#: Shared memory the prefill defaults may plan for: the H100's 232,448 B per block less 2 KB of
#: Triton's own (d=128 bf16 with 3 stages: 229,376 B of tiles, 230,400 B compiled).
_PREFILL_SMEM_BUDGET = 232448 - 2048


@functools.lru_cache(maxsize=256)
def _fit_stages(opts: KernelOptions, dk: int, dv: int, element_size: int) -> KernelOptions:
    """Fewer pipeline stages where the tiles would not fit in shared memory (float32 at d >= 128):
    the tiles, and so the skip decisions, stay the caller's (stages change speed only). Cached: it
    runs on every call's host path, and ``dataclasses.replace`` costs ~4 µs."""
    stages = opts.num_stages
    while stages > 1 and element_size * (opts.block_m * dk + stages * opts.block_n * (dk + dv)) > _PREFILL_SMEM_BUDGET:
        stages -= 1
    return dataclasses.replace(opts, num_stages=stages)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_tensor(name: str, t: torch.Tensor, ndim: int, device: torch.device, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"Invalid shape of {name}: expected {ndim} dims, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of q)")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def _check_runnable(q: torch.Tensor) -> None:
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"the Triton kernels need CUDA tensors (q is on {q.device}); on CPU set TRITON_INTERPRET=1 "
            "before importing triton, or use blasst_kernels.reference"
        )
    if q.dtype == torch.bfloat16 and _interpreting():
        raise ValueError("bf16 tl.dot is wrong under TRITON_INTERPRET=1 (triton 3.6); use float16/float32 on CPU")


def _head_dims(dk: int, dv: int) -> Tuple[int, int, int]:
    """(BLOCK_D, BLOCK_DPE, BLOCK_DV) for a supported (qk, v) head-dim pair."""
    if (dk, dv) not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"unsupported head dims (qk={dk}, v={dv}); supported: {list(SUPPORTED_HEAD_DIMS)}")
    dpe = dk - dv if dk != dv else 0
    return dk - dpe, dpe, dv


def _scale_tensor(factor: Union[ScaleFactor, torch.Tensor], num_heads: int, device: torch.device) -> Optional[torch.Tensor]:
    """The per-head float32 factor tensor on ``device``, or ``None`` when dense.

    A float32 tensor already on a CUDA ``device`` is used as is, with no value check (that would
    cost a device sync per call): validate it once with :func:`validate_scale_factor`. Should it
    hold NaN or negative entries anyway, the kernels treat those heads as dense. A float is
    checked and made into a table once per (value, heads, device) (:func:`_float_factors`).
    """
    if isinstance(factor, torch.Tensor) and factor.device == device and factor.dtype == torch.float32:
        if factor.shape != (num_heads,):
            raise ValueError(f"Invalid shape of threshold_scale_factor: expected ({num_heads},), got {tuple(factor.shape)}")
        if device.type != "cuda":
            validate_scale_factor(factor, num_heads, "threshold_scale_factor")
        return factor
    if isinstance(factor, (int, float)) and not isinstance(factor, bool):
        return _float_factors(float(factor), num_heads, device)
    return _factor_table(validate_scale_factor(factor, num_heads, "threshold_scale_factor"), num_heads, device)


def _factor_table(values: Optional[torch.Tensor], num_heads: int, device: torch.device) -> Optional[torch.Tensor]:
    """Validated factors (:func:`validate_scale_factor`'s result) as the kernels' ``(num_heads,)`` float32 table."""
    if values is None:
        return None
    if device.type == "cuda":
        return _device_factors(tuple(values.tolist()), num_heads, device)
    return values.to(torch.float32).expand(num_heads).contiguous()


@functools.lru_cache(maxsize=64)
def _float_factors(factor: float, num_heads: int, device: torch.device) -> Optional[torch.Tensor]:
    """The table of one float factor, checked once per (factor, heads, device): the check's small CPU
    tensor ops took 23.5 µs of every call's host path on the H100 machine, where a short call's kernel
    takes ~0.2 ms (``benchmarks/NOTES.md`` v12). A bad value raises and is not cached."""
    return _factor_table(validate_scale_factor(factor, num_heads, "threshold_scale_factor"), num_heads, device)


@functools.lru_cache(maxsize=64)
def _device_factors(values: Tuple[float, ...], num_heads: int, device: torch.device) -> torch.Tensor:
    """The ``(num_heads,)`` float32 device copy of validated factors, made once per (values, heads,
    device): a copy from pageable host memory synchronises the stream, so making it on every call
    left the GPU idle while the host launched the next kernel (the kernels only read it)."""
    return torch.tensor(values, dtype=torch.float32).expand(num_heads).contiguous().to(device)


def _output(out: Optional[torch.Tensor], shape: Tuple[int, ...], q: torch.Tensor) -> torch.Tensor:
    """``out`` checked against ``shape`` and ``q``'s dtype/device, or a new tensor."""
    if out is None:
        return torch.empty(shape, dtype=q.dtype, device=q.device)
    if tuple(out.shape) != shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"Invalid out: expected {shape} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def _check_indptr(name: str, t: torch.Tensor, batch: Optional[int], device) -> int:
    _check_tensor(name, t, 1, device, (torch.int32, torch.int64))
    if batch is not None and t.shape[0] != batch + 1:
        raise ValueError(f"Invalid shape of {name}: expected ({batch + 1},), got {tuple(t.shape)}")
    return t.shape[0] - 1


def _stats_tensor(stats: Optional[torch.Tensor], num_heads: int, device) -> Optional[torch.Tensor]:
    if stats is None:
        return None
    _check_tensor("stats", stats, 2, device, (torch.int32,))
    if stats.shape != (num_heads, 2):
        raise ValueError(f"Invalid shape of stats: expected ({num_heads}, 2) int32, got {tuple(stats.shape)}")
    return stats


def extend_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_buffer: Optional[torch.Tensor],
    v_buffer: Optional[torch.Tensor],
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    sm_scale: Optional[float] = None,
    causal: bool = True,
    threshold_scale_factor: ScaleFactor = None,
    max_extend_len: Optional[int] = None,
    stats: Optional[torch.Tensor] = None,
    return_skip_map: bool = False,
    out: Optional[torch.Tensor] = None,
    options: Optional[KernelOptions] = None,
):
    """BLASST prefill of new tokens over a cached, paged prefix (SGLang's *extend*).

    Args:
        q: ``(N, Hq, Dk)`` queries of all new tokens, ``N = qo_indptr[-1]``; fp16/bf16/fp32.
        k, v: ``(N, Hkv, Dk)`` / ``(N, Hkv, Dv)`` keys and values of the new tokens.
        k_buffer, v_buffer: ``(slots, Hkv, Dk)`` / ``(slots, Hkv, Dv)`` paged KV cache holding the
            prefixes (``None`` when no sequence has one: then ``kv_indptr`` must be all zeros).
        qo_indptr: ``(B + 1,)`` int32/int64 offsets of each sequence's new tokens.
        kv_indptr, kv_indices: the prefix of each sequence as token slots (see module doc).
        sm_scale: softmax scale, default ``1/sqrt(Dk)``.
        causal: new tokens attend causally to each other (always fully to their prefix).
        threshold_scale_factor: see module doc; λ uses ``prefix + new`` tokens as the length.
        max_extend_len: the largest ``qo_indptr[b+1] - qo_indptr[b]``; computed (a device sync) if None.
        stats: optional ``(Hq, 2)`` int32 counters, incremented by (tiles visited, tiles skipped).
        return_skip_map: also return an int8 ``(B, Hq, NQ, T)`` map of
            :class:`~blasst_kernels.reference.TileState` (sync; for small problems).
        out: optional ``(N, Hq, Dv)`` output buffer.
        options: tile sizes; default :func:`default_options`.

    Returns:
        ``out (N, Hq, Dv)`` in ``q``'s dtype, or ``(out, skip_map)``.
    """
    from .triton_prefill import launch_extend

    _check_tensor("q", q, 3, q.device, _SUPPORTED_DTYPES)
    device = q.device
    n_tokens, num_heads, dk = q.shape
    _check_tensor("k", k, 3, device, (q.dtype,))
    _check_tensor("v", v, 3, device, (q.dtype,))
    kv_heads, dv = k.shape[1], v.shape[2]
    if k.shape[0] != n_tokens or v.shape[0] != n_tokens or k.shape[2] != dk or v.shape[1] != kv_heads:
        raise ValueError(
            f"Invalid shape of k/v: expected ({n_tokens}, Hkv, {dk}) / ({n_tokens}, Hkv, Dv), "
            f"got {tuple(k.shape)} / {tuple(v.shape)}"
        )
    if num_heads % kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({kv_heads})")
    block_d, block_dpe, block_dv = _head_dims(dk, dv)
    batch = _check_indptr("qo_indptr", qo_indptr, None, device)
    _check_indptr("kv_indptr", kv_indptr, batch, device)
    _check_tensor("kv_indices", kv_indices, 1, device, (torch.int32, torch.int64))
    if k_buffer is None or v_buffer is None:
        k_buffer, v_buffer = k, v  # never read: every prefix is empty
    else:
        _check_tensor("k_buffer", k_buffer, 3, device, (q.dtype,))
        _check_tensor("v_buffer", v_buffer, 3, device, (q.dtype,))
        if k_buffer.shape[1:] != (kv_heads, dk) or v_buffer.shape[1:] != (kv_heads, dv):
            raise ValueError(
                f"Invalid shape of k_buffer/v_buffer: expected (slots, {kv_heads}, {dk}) / (slots, {kv_heads}, {dv}), "
                f"got {tuple(k_buffer.shape)} / {tuple(v_buffer.shape)}"
            )
    _check_runnable(q)
    scale = _scale_tensor(threshold_scale_factor, num_heads, device)
    stats = _stats_tensor(stats, num_heads, device)
    opts = _fit_stages(options or default_options(dk, dv, "prefill"), dk, dv, q.element_size())
    out = _output(out, (n_tokens, num_heads, dv), q)
    if max_extend_len is None:
        max_extend_len = int((qo_indptr[1:] - qo_indptr[:-1]).max()) if batch else 0
    skip_map = None
    if return_skip_map:
        ext = (qo_indptr[1:] - qo_indptr[:-1]).cpu()
        pre = (kv_indptr[1:] - kv_indptr[:-1]).cpu()
        n_q = -(-int(ext.max()) // opts.block_m) if batch else 0
        n_t = int(((pre + opts.block_n - 1) // opts.block_n + (ext + opts.block_n - 1) // opts.block_n).max()) if batch else 0
        skip_map = torch.zeros(batch, num_heads, max(n_q, 1), max(n_t, 1), dtype=torch.int8, device=device)
    if batch and max_extend_len > 0 and _gluon_applies(q, k, v, out, causal, opts, skip_map):
        from .gluon_prefill import SPECULATE_BELOW, gluon_prefill

        prefix = {}
        if kv_indices.numel():  # TMA cannot gather pages: copy the prefixes out (a small fraction of the work)
            prefix = dict(k_prefix=k_buffer.index_select(0, kv_indices), v_prefix=v_buffer.index_select(0, kv_indices),
                          kv_indptr=kv_indptr)
        gluon_prefill(
            q, k, v, out, qo_indptr, scale, stats,
            sm_scale=1.0 / math.sqrt(dk) if sm_scale is None else float(sm_scale), max_extend_len=int(max_extend_len),
            block_n=opts.block_n, speculate=opts.expected_sparsity is not None
            and opts.expected_sparsity < SPECULATE_BELOW,
            **prefix,
        )
    elif batch and max_extend_len > 0:
        launch_extend(
            q, k, v, k_buffer, v_buffer, out, qo_indptr, kv_indptr, kv_indices,
            scale, stats, skip_map,
            sm_scale=1.0 / math.sqrt(dk) if sm_scale is None else float(sm_scale), causal=bool(causal),
            skip=scale is not None, batch=batch, max_extend_len=int(max_extend_len),
            block_m=opts.block_m, block_n=opts.block_n, block_d=block_d, block_dpe=block_dpe, block_dv=block_dv,
            num_warps=opts.num_warps, num_stages=opts.num_stages,
        )
    return (out, skip_map) if return_skip_map else out


#: (head dim, block_m, block_n) the Gluon prefill kernel serves (verified on an H100).
_GLUON_SHAPES = ((128, 64, 128),)


def _gluon_applies(q, k, v, out, causal, opts: KernelOptions, skip_map) -> bool:
    """Whether :func:`extend_attention` runs the Gluon Hopper kernel (see :class:`KernelOptions`)."""
    if opts.kernel != "auto" or skip_map is not None or not causal or _interpreting():
        return False
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or v.shape[2] != q.shape[2]:
        return False
    if (q.shape[2], opts.block_m, opts.block_n) not in _GLUON_SHAPES:
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    # TMA: heads packed, rows and base 16-byte aligned.
    return all(
        x.stride(1) == x.shape[2] and not (x.stride(0) * x.element_size()) % 16 and not x.data_ptr() % 16
        for x in (q, k, v, out)
    ) and _gluon_importable()


def _gluon_importable() -> bool:
    try:
        from . import gluon_prefill  # noqa: F401
    except ImportError:  # a triton without Gluon's Hopper API
        return False
    return True


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    max_seqlen: Optional[int] = None,
    **kwargs,
):
    """Ragged (varlen) BLASST prefill with no cached prefix.

    Args:
        q: ``(N, Hq, Dk)``; k, v: ``(N, Hkv, Dk)`` / ``(N, Hkv, Dv)``.
        cu_seqlens: ``(B + 1,)`` int32 sequence offsets into the token dimension.
        max_seqlen: the longest sequence (computed with a device sync if None).
        **kwargs: as :func:`extend_attention` (``sm_scale``, ``causal``, ``threshold_scale_factor``,
            ``stats``, ``return_skip_map``, ``out``, ``options``).
    """
    _check_indptr("cu_seqlens", cu_seqlens, None, q.device)
    no_prefix = torch.zeros_like(cu_seqlens)
    empty = torch.zeros(0, dtype=torch.int32, device=q.device)
    return extend_attention(q, k, v, None, None, cu_seqlens, no_prefix, empty, max_extend_len=max_seqlen, **kwargs)


#: Resident programs per SM of the sm_90 decode (Gluon, 64-key tiles: 69 KB of shared memory and
#: up to 168 registers per 128-thread program), the default unit of :func:`default_num_kv_splits`'
#: waves. At head dim 128 :func:`decode_attention` runs 8-warp programs, two per SM, and counts its
#: splits' waves in those (:func:`blasst_kernels.gluon_decode.own_splits_num_warps`).
DECODE_PROGRAMS_PER_SM = 3
#: Splits of two waves shorter than this many tiles fall back to one wave; no split is made
#: shorter than ``MIN_SPLIT_TILES`` tiles (a split re-reads its seed tiles and runs its own prologue).
LONG_SPLIT_TILES = 32
MIN_SPLIT_TILES = 16
_WAVE_FILL = 0.97  # aim just under whole waves: a wave 1.3x full ran at 0.85x of one just under


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (an H100's 132 off the GPU, for CPU tests)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def default_num_kv_splits(
    kv_lens: torch.Tensor, kv_heads: int, block_n: int, max_kv_splits: int = 128, *, sms: Optional[int] = None,
    programs_per_sm: int = DECODE_PROGRAMS_PER_SM, long_split_tiles: int = LONG_SPLIT_TILES,
) -> torch.Tensor:
    """KV splits per request, on device and without a sync (CUDA-graph safe; one small launch).

    Every request is cut into chunks of about the same number of keys, sized so that the
    ``(request, decode tile of heads, split)`` programs fill the GPU's resident slots
    (``programs_per_sm`` per SM) twice, just under: with one program per slot and wave
    the last, partial wave decides the time (H100, ``benchmarks/NOTES.md`` v8: 1.3 waves ran at
    0.85x the speed of 1.94 or 2.9, and skipping tiles makes programs unequal, which more waves
    even out). When two waves' chunks would be shorter than ``long_split_tiles`` tiles (few,
    short requests), one wave; never shorter than :data:`MIN_SPLIT_TILES` tiles; at most
    ``max_kv_splits`` per request.

    Args:
        kv_lens: ``(B,)`` integer KV length of each request (device tensor).
        kv_heads: programs per request and split: the KV heads, times the tiles of heads per KV
            group for groups of more than 16 query heads
            (:func:`blasst_kernels.reference.decode_head_blocks`).
        block_n: keys per tile.
        max_kv_splits: upper bound per request (the size of the partial-result workspaces).
        sms: streaming multiprocessors; default the device's (132 on CPU).
        programs_per_sm: resident programs per SM of the kernel that runs the splits; default
            :data:`DECODE_PROGRAMS_PER_SM` (the 4-warp decode).
        long_split_tiles: the shortest chunk, in tiles, worth a second wave; default
            :data:`LONG_SPLIT_TILES` (the 4-warp decode).

    Returns:
        ``(B,)`` int32 on ``kv_lens``' device.
    """
    from .triton_decode import num_kv_splits_kernel

    slots = programs_per_sm * (_sm_count(kv_lens.device) if sms is None else sms)
    batch = kv_lens.shape[0]
    out = torch.empty(batch, dtype=torch.int32, device=kv_lens.device)
    if batch:
        num_kv_splits_kernel[(1,)](
            kv_lens.contiguous(), out, batch, kv_heads, max_kv_splits, int(2 * slots * _WAVE_FILL), int(slots * _WAVE_FILL),
            long_split_tiles * block_n, MIN_SPLIT_TILES * block_n, BLOCK=1024,
        )
    return out


def workspace_kv_splits(batch: int, kv_heads: int, sms: int) -> int:
    """A ``max_kv_splits`` for :func:`default_num_kv_splits` known without a sync: up to twice what
    ``batch`` equal requests would get (a longer request than its peers may take more), at least 16
    and at most 128. Workspaces are ``(B, Hq, max_kv_splits, Dv)`` float32."""
    programs = 2 * DECODE_PROGRAMS_PER_SM * sms
    return max(16, min(128, 2 * -(-programs // max(batch * kv_heads, 1))))


@dataclass(frozen=True)
class DecodeSplits:
    """How a decode batch's keys are split over programs (split-KV), made once per batch by
    :func:`plan_decode_splits` and passed as ``num_kv_splits=`` to every layer's
    :func:`decode_attention`: one small launch and one pair of workspaces per batch instead of per layer.

    Attributes:
        num_kv_splits: ``(B,)`` int32 splits per request, on the device.
        max_kv_splits: the workspaces' split dimension.
        num_warps: the Gluon decode's warps per program the splits were sized for (their waves are
            counted in those programs); ``None``: sized for the Triton decode, the launch picks.
        partial_out, partial_lse: float32 ``(B, Hq, max_kv_splits, Dv)`` / ``(B, Hq, max_kv_splits)``
            per-split results, used by the calls given no workspaces of their own.
    """

    num_kv_splits: torch.Tensor
    max_kv_splits: int
    num_warps: Optional[int]
    partial_out: torch.Tensor
    partial_lse: torch.Tensor


def plan_decode_splits(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    *,
    max_kv_splits: Optional[int] = None,
    options: Optional[KernelOptions] = None,
) -> DecodeSplits:
    """The splits :func:`decode_attention` makes when given none, for a batch whose layers share
    ``kv_indptr`` and the shapes, dtype and layout of ``q``/``k_buffer``/``v_buffer`` (any one layer's
    tensors plan for all). On the device, no sync: CUDA graphs capture its launch.

    Args:
        q, k_buffer, v_buffer, kv_indptr, options: as for :func:`decode_attention`.
        max_kv_splits: most splits per request; default :func:`workspace_kv_splits`.

    Returns:
        A :class:`DecodeSplits`, its workspaces allocated.
    """
    batch, num_heads, dk, kv_tiles, dv = _decode_shapes(q, k_buffer, v_buffer)
    _check_indptr("kv_indptr", kv_indptr, batch, q.device)
    if max_kv_splits is None:
        max_kv_splits = workspace_kv_splits(batch, kv_tiles, _sm_count(q.device))
    if max_kv_splits < 1:
        raise ValueError(f"max_kv_splits must be >= 1, got {max_kv_splits}")
    _check_runnable(q)
    opts = options or default_options(dk, dv, "decode")
    gluon = bool(batch) and _gluon_decode_applies(q, k_buffer, v_buffer, opts, False)
    splits, warps = _own_splits(kv_indptr, kv_tiles, dk, opts.block_n, max_kv_splits, gluon)
    return DecodeSplits(splits, max_kv_splits, warps, *_decode_workspaces(batch, num_heads, max_kv_splits, dv, q.device))


def _decode_workspaces(batch: int, num_heads: int, max_kv_splits: int, dv: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float32 per-split results: ``partial_out (B, Hq, max_kv_splits, Dv)``, ``partial_lse (B, Hq, max_kv_splits)``."""
    return (torch.empty(batch, num_heads, max_kv_splits, dv, dtype=torch.float32, device=device),
            torch.empty(batch, num_heads, max_kv_splits, dtype=torch.float32, device=device))


def _own_splits(kv_indptr, kv_tiles: int, head_dim: int, block_n: int, max_kv_splits: int,
                gluon: bool) -> Tuple[torch.Tensor, Optional[int]]:
    """:func:`default_num_kv_splits` in waves of the programs that will run them, and their warps
    (``None``: the Triton decode's)."""
    warps, waves = None, {}
    if gluon:
        from .gluon_decode import CTAS_PER_SM, SECOND_WAVE_TILES, own_splits_num_warps

        warps = own_splits_num_warps(head_dim)
        waves = dict(programs_per_sm=CTAS_PER_SM[warps], long_split_tiles=SECOND_WAVE_TILES[warps])
    return default_num_kv_splits(kv_indptr[1:] - kv_indptr[:-1], kv_tiles, block_n, max_kv_splits, **waves), warps


def _decode_shapes(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> Tuple[int, int, int, int, int]:
    """Validated decode shapes: ``(B, Hq, Dk, decode tiles of heads per request, Dv)``."""
    _check_tensor("q", q, 3, q.device, _SUPPORTED_DTYPES)
    batch, num_heads, dk = q.shape
    _check_tensor("k_buffer", k_buffer, 3, q.device, (q.dtype,))
    _check_tensor("v_buffer", v_buffer, 3, q.device, (q.dtype,))
    kv_heads, dv = k_buffer.shape[1], v_buffer.shape[2]
    if k_buffer.shape[2] != dk or v_buffer.shape[1] != kv_heads:
        raise ValueError(
            f"Invalid shape of k_buffer/v_buffer: expected (slots, Hkv, {dk}) / (slots, Hkv, Dv), "
            f"got {tuple(k_buffer.shape)} / {tuple(v_buffer.shape)}"
        )
    if num_heads % kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({kv_heads})")
    _, tiles_per_group = decode_head_blocks(num_heads // kv_heads)
    return batch, num_heads, dk, kv_heads * tiles_per_group, dv


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    sm_scale: Optional[float] = None,
    threshold_scale_factor: ScaleFactor = None,
    num_kv_splits: Union[torch.Tensor, DecodeSplits, None] = None,
    max_kv_splits: Optional[int] = None,
    stats: Optional[torch.Tensor] = None,
    return_skip_map: bool = False,
    out: Optional[torch.Tensor] = None,
    partial_out: Optional[torch.Tensor] = None,
    partial_lse: Optional[torch.Tensor] = None,
    options: Optional[KernelOptions] = None,
):
    """BLASST split-KV decode: one new token per request over its paged KV.

    Args:
        q: ``(B, Hq, Dk)`` the new token of each request; fp16/bf16/fp32.
        k_buffer, v_buffer: ``(slots, Hkv, Dk)`` / ``(slots, Hkv, Dv)`` paged KV cache (the new
            token's K/V already written).
        kv_indptr, kv_indices: each request's whole context as token slots (see module doc).
        threshold_scale_factor: see module doc; λ uses each request's KV length.
        num_kv_splits: ``(B,)`` int32 splits per request (values above ``max_kv_splits`` are
            clamped to it), or a :class:`DecodeSplits` plan (its splits, warps and workspaces);
            default: :func:`plan_decode_splits`'s. Every split counts each head's
            max over the last tile as seen, and splits after the first over tile 0 too (see
            :mod:`blasst_kernels.reference`), so the split count barely moves what is skipped.
        max_kv_splits: most splits per request, the workspaces' size; default: a plan's, the
            workspaces' when given, else :func:`workspace_kv_splits`.
        stats: optional ``(Hq, 2)`` int32 counters (tiles visited, skipped); a decode tile's counts
            are added to each of its heads.
        return_skip_map: also return an int8 ``(B, G, ceil(max_kv_len / block_n))`` TileState map,
            one row per decode tile of heads: ``G = Hkv`` for KV groups of at most 16 query heads,
            larger groups decide in blocks of 16 (:func:`blasst_kernels.reference.decode_tile_of_head`).
        out: optional ``(B, Hq, Dv)`` output buffer.
        partial_out, partial_lse: optional float32 workspaces of at least
            ``(B, Hq, max_kv_splits, Dv)`` / ``(B, Hq, max_kv_splits)`` for the per-split results
            (SGLang's ``attn_logits`` / ``attn_lse``); default: a plan's, else allocated per call.
        options: tile sizes (``block_n``); default :func:`default_options`.

    Returns:
        ``out (B, Hq, Dv)`` in ``q``'s dtype, or ``(out, skip_map)``.
    """
    from .triton_decode import launch_decode

    batch, num_heads, dk, kv_tiles, dv = _decode_shapes(q, k_buffer, v_buffer)
    device = q.device
    per_tile, tiles_per_group = decode_head_blocks(num_heads // k_buffer.shape[1])
    block_d, block_dpe, block_dv = _head_dims(dk, dv)
    _check_indptr("kv_indptr", kv_indptr, batch, device)
    _check_tensor("kv_indices", kv_indices, 1, device, (torch.int32, torch.int64))
    if isinstance(num_kv_splits, DecodeSplits):
        if max_kv_splits not in (None, num_kv_splits.max_kv_splits):
            raise ValueError(f"max_kv_splits={max_kv_splits} contradicts the plan's {num_kv_splits.max_kv_splits}")
        max_kv_splits = num_kv_splits.max_kv_splits
    elif max_kv_splits is None:
        if partial_out is not None and partial_out.dim() == 4:
            max_kv_splits = partial_out.shape[2]
        else:
            max_kv_splits = workspace_kv_splits(batch, kv_tiles, _sm_count(device))
    if max_kv_splits < 1:
        raise ValueError(f"max_kv_splits must be >= 1, got {max_kv_splits}")
    _check_runnable(q)
    opts = options or default_options(dk, dv, "decode")
    gluon = bool(batch) and _gluon_decode_applies(q, k_buffer, v_buffer, opts, return_skip_map)
    warps = None  # splits given as a tensor: the Gluon decode picks its warps for them
    if num_kv_splits is None:
        num_kv_splits, warps = _own_splits(kv_indptr, kv_tiles, dk, opts.block_n, max_kv_splits, gluon)
    elif isinstance(num_kv_splits, DecodeSplits):
        plan = num_kv_splits
        num_kv_splits, warps = plan.num_kv_splits, plan.num_warps
        if partial_out is None or partial_lse is None:
            partial_out, partial_lse = plan.partial_out, plan.partial_lse
    _check_tensor("num_kv_splits", num_kv_splits, 1, device, (torch.int32,))
    if num_kv_splits.shape[0] != batch:
        raise ValueError(f"Invalid shape of num_kv_splits: expected ({batch},), got {tuple(num_kv_splits.shape)}")
    scale = _scale_tensor(threshold_scale_factor, num_heads, device)
    stats = _stats_tensor(stats, num_heads, device)
    out = _output(out, (batch, num_heads, dv), q)
    if partial_out is None or partial_lse is None:
        partial_out, partial_lse = _decode_workspaces(batch, num_heads, max_kv_splits, dv, device)
    for name, t, shape in (("partial_out", partial_out, (batch, num_heads, max_kv_splits, dv)),
                           ("partial_lse", partial_lse, (batch, num_heads, max_kv_splits))):
        _check_tensor(name, t, len(shape), device, (torch.float32,))
        if any(have < need for have, need in zip(t.shape, shape)):
            raise ValueError(f"Invalid shape of {name}: expected at least {shape}, got {tuple(t.shape)}")
    skip_map = None
    if return_skip_map:
        n_t = -(-int((kv_indptr[1:] - kv_indptr[:-1]).max()) // opts.block_n) if batch else 0
        skip_map = torch.zeros(batch, kv_tiles, max(n_t, 1), dtype=torch.int8, device=device)
    sm_scale = 1.0 / math.sqrt(dk) if sm_scale is None else float(sm_scale)
    if gluon:
        from .gluon_decode import gluon_decode

        gluon_decode(q, k_buffer, v_buffer, out, partial_out, partial_lse, kv_indptr, kv_indices, num_kv_splits,
                     max_kv_splits, scale, stats, sm_scale=sm_scale, heads_per_tile=per_tile,
                     tiles_per_group=tiles_per_group, num_warps=warps)
    elif batch:
        launch_decode(
            q, k_buffer, v_buffer, out, partial_out, partial_lse, kv_indptr, kv_indices, num_kv_splits, max_kv_splits,
            scale, stats, skip_map,
            sm_scale=sm_scale, skip=scale is not None, heads_per_tile=per_tile, tiles_per_group=tiles_per_group,
            block_n=opts.block_n,
            block_d=block_d, block_dpe=block_dpe, block_dv=block_dv,
            num_warps=opts.num_warps, num_stages=opts.num_stages,
        )
    return (out, skip_map) if return_skip_map else out


def _gluon_decode_applies(q, k_buffer, v_buffer, opts: KernelOptions, return_skip_map: bool) -> bool:
    """Whether :func:`decode_attention` runs the Gluon Hopper kernel (see :class:`KernelOptions`)."""
    if opts.kernel != "auto" or return_skip_map or _interpreting() or q.device.type != "cuda":
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or v_buffer.shape[2] != q.shape[2]:
        return False
    try:
        from . import gluon_decode as gd
    except ImportError:  # a triton without Gluon's Ampere/Hopper API
        return False
    if q.shape[2] not in gd.HEAD_DIMS or opts.block_n != gd.BLOCK_N:
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    # cp.async moves 16 bytes: token rows and head starts 16-byte aligned.
    return all(not (x.stride(0) * x.element_size()) % 16 and not (x.stride(1) * x.element_size()) % 16
               and not x.data_ptr() % 16 for x in (k_buffer, v_buffer))
