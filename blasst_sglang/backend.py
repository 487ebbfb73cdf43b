"""``BlasstAttnBackend``: SGLang's triton attention backend with BLASST's extend and decode kernels.

Everything SGLang's :class:`TritonAttnBackend` does around the kernels stays its own: metadata,
paged KV and radix prefixes, chunked prefill, KV writes, CUDA-graph decode. Only its two kernel
entry points (``extend_attention_fwd``, ``decode_attention_fwd``, instance attributes set in its
``__init__``) are replaced by adapters that call :func:`blasst_kernels.extend_attention` /
:func:`blasst_kernels.decode_attention` with this layer's threshold scale factors, or, for what
BLASST does not support in a call, SGLang's own dense kernel (counted in :attr:`fallbacks` and
logged once per reason). BLASST's decode splits each batch's keys its own way
(:func:`blasst_kernels.plan_decode_splits`, once per batch); SGLang's split counts and
workspaces serve its dense kernel only.

Factors are ``(num_layers, num_local_heads)`` float32 tables kept on the device, one per phase;
a layer passes its row (``(num_local_heads,)``, a view: no copy, CUDA-graph safe).

MLA models (DeepSeek-style) reach this backend through SGLang's default MLA dispatch for unknown
backend names (the ``triton`` handler): extend without a cached prefix runs the MHA form
(qk 192 / v 128, the KV cache holds the latent so the call has no prefix), extend with a prefix and
decode run the absorbed form (qk 576 / v 512 over the latent cache). All three are BLASST kernels.
"""

from __future__ import annotations

import dataclasses

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

import blasst_kernels
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
from sglang.srt.runtime_context import get_parallel

from .config import BlasstConfig
from .hints import PrefillHints
from .stats import SkipCounters, SparsityReport

__all__ = ["BlasstAttnBackend"]

logger = logging.getLogger(__name__)

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Keyword arguments of SGLang's kernels that change nothing for BLASST's kernels: KV buffers are
#: 3-D with token-slot indices at any page size (4-D buffers that are read fall back), MLA needs
#: no flag, PDL is a launch detail.
_NEUTRAL_OPTIONS = frozenset({"page_size", "has_mla", "use_pdl", "skip_prefix_custom_mask"})


def _is_off(value) -> bool:
    """SGLang's "feature off" values for kernel options: ``None``, ``False``, ``0`` and ``-1``."""
    return value is None or (isinstance(value, (bool, int, float)) and value in (0, -1))


@dataclass
class _PhaseFactors:
    """Threshold scale factors of one phase on the device.

    Attributes:
        table: ``(num_layers, num_local_heads)`` float32, or ``None`` when the phase is dense.
        dense_layers: per layer, True when all its factors are 0 (the kernel then runs without skipping).
    """

    table: Optional[torch.Tensor]
    dense_layers: List[bool]

    @classmethod
    def build(cls, full: Optional[torch.Tensor], head_start: int, num_heads: int, device) -> "_PhaseFactors":
        """Slice a ``(num_layers, total_heads)`` CPU table to this rank's heads and move it to ``device``."""
        if full is None:
            return cls(None, [])
        local = full[:, head_start : head_start + num_heads].contiguous()
        return cls(local.to(device), (local == 0).all(dim=1).tolist())

    def for_layer(self, layer_id: int) -> Optional[torch.Tensor]:
        """``(num_local_heads,)`` float32 device view of one layer's factors; ``None`` when dense."""
        if self.table is None or self.dense_layers[layer_id]:
            return None
        return self.table[layer_id]


class BlasstAttnBackend(TritonAttnBackend):
    """SGLang attention backend running BLASST tile skipping inside the triton backend's flow.

    Args:
        model_runner: SGLang's ``ModelRunner``.
        config: BLASST settings; default :meth:`BlasstConfig.from_env`.
        **kwargs: passed to :class:`TritonAttnBackend` (``skip_prefill``, ``kv_indptr_buf``).

    Attributes:
        config: the :class:`BlasstConfig` in use.
        fallbacks: ``Counter`` of kernel calls served by SGLang's dense kernel, by reason.
        counters: :class:`SkipCounters` when ``config.stats_interval > 0``, else ``None``.
        prefill_hints: :class:`PrefillHints`, each layer's measured prefill sparsity passed to the
            kernels as their speed hint; ``None`` while prefill is dense.
    """

    def __init__(self, model_runner, config: Optional[BlasstConfig] = None, **kwargs):
        super().__init__(model_runner, **kwargs)
        self.config = BlasstConfig.from_env() if config is None else config
        model_config = model_runner.model_config
        parallel = get_parallel()
        self.num_layers = num_layers = model_config.num_attention_layers
        total_heads = model_config.num_attention_heads
        if total_heads % parallel.attn_tp_size:
            raise ValueError(
                f"BLASST needs the query heads ({total_heads}) to divide evenly over the attention TP size "
                f"({parallel.attn_tp_size})"
            )
        self.num_local_heads = total_heads // parallel.attn_tp_size
        head_start = parallel.attn_tp_rank * self.num_local_heads
        tables = self.config.scale_factor_tables(num_layers, total_heads)
        self._factors: Dict[str, _PhaseFactors] = {
            phase: _PhaseFactors.build(table, head_start, self.num_local_heads, self.device)
            for phase, table in tables.items()
        }
        self._calibrated_tiles = self.config.calibrated_tiles()
        # Per layer, the prefill sparsity measured on this server's batches (a speed hint for the
        # kernels, KernelOptions.expected_sparsity), starting from the calibration's prediction at
        # these factors when it has one; None while prefill is dense.
        self.prefill_hints: Optional[PrefillHints] = None
        if tables["prefill"] is not None:
            predicted = self.config.predicted_sparsity("prefill", tables["prefill"])
            initial = None
            if predicted is not None:
                initial = predicted[:, head_start : head_start + self.num_local_heads].mean(dim=1).tolist()
            self.prefill_hints = PrefillHints(num_layers, self.num_local_heads, self.device, initial)
        self._option_cache: Dict[tuple, blasst_kernels.KernelOptions] = {}
        self.fallbacks: Counter = Counter()
        self.counters = (
            SkipCounters(num_layers, self.num_local_heads, self.device) if self.config.stats_interval else None
        )
        self._layer = None
        self._prefix_lens_cpu = None
        # This batch's decode plan (its kv_indptr, the shapes planned for, the plan), made by its
        # first BLASST decode call: see _planned_decode.
        self._decode_plan: Optional[Tuple[torch.Tensor, tuple, blasst_kernels.DecodeSplits]] = None
        self._dense_extend = self.extend_attention_fwd
        self._dense_decode = self.decode_attention_fwd
        # Kept out of torch.compile'd graphs, as SGLang does for its own kernels.
        self.extend_attention_fwd = torch.compiler.disable(self._extend_kernel)
        self.decode_attention_fwd = torch.compiler.disable(self._decode_kernel)
        if self.enable_deterministic:
            logger.warning("BLASST: deterministic inference runs SGLang's unified dense extend kernel; only decode skips tiles")
        logger.info(
            "BLASST attention backend: %s (%d layers, heads %d..%d of %d)",
            self.config.describe(), num_layers, head_start, head_start + self.num_local_heads - 1, total_heads,
        )

    # ------------------------------------------------------------------ SGLang's backend interface

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self._decode_plan = None
        self._count_batch()
        if self.prefill_hints is not None and forward_batch.forward_mode.is_extend():
            self.prefill_hints.harvest()

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        super().init_forward_metadata_out_graph(forward_batch, in_capture=in_capture)
        self._decode_plan = None
        if not in_capture:
            self._count_batch()

    def on_after_cuda_graph_warmup(self):
        super().on_after_cuda_graph_warmup()
        if self.counters is not None:
            self.counters.reset()  # warm-up batches are dummies

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self._layer, self._prefix_lens_cpu = layer, forward_batch.extend_prefix_lens_cpu
        try:
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        finally:
            self._layer = self._prefix_lens_cpu = None

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self._layer = layer
        try:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        finally:
            self._layer = None

    # ------------------------------------------------------------------ observability

    def threshold_scale_factors(self, phase: str) -> Optional[torch.Tensor]:
        """The ``(num_layers, num_local_heads)`` float32 device table of ``phase``; ``None`` when dense."""
        return self._factors[phase].table

    def sparsity_report(self) -> SparsityReport:
        """Host copy of the skip counters (synchronises); needs ``--blasst-stats``."""
        if self.counters is None:
            raise RuntimeError("skip counters are off: start with --blasst-stats [N] (or BLASST_STATS=N)")
        return self.counters.report()

    @property
    def decode_splits(self) -> Optional[torch.Tensor]:
        """``(B,)`` int32 KV splits per request of this batch's BLASST decode calls (device); ``None``
        before the batch's first one. BLASST's own, not SGLang's: see :meth:`_planned_decode`."""
        return None if self._decode_plan is None else self._decode_plan[2].num_kv_splits

    def reset_stats(self) -> None:
        """Zero the skip counters and the batch count."""
        if self.counters is not None:
            self.counters.reset()

    def _count_batch(self) -> None:
        if self.counters is None:
            return
        self.counters.batches += 1
        if self.counters.batches % self.config.stats_interval == 0:
            logger.info(self.counters.report().to_string())

    # ------------------------------------------------------------------ kernel adapters

    def _extend_kernel(
        self, q, k, v, o, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices,
        custom_mask, causal, mask_indptr, max_extend_len, k_descale, v_descale, sm_scale=None, **options,
    ):
        """Drop-in for SGLang's ``extend_attention_fwd`` (same arguments): BLASST, or dense fallback.

        ``q (N, Hq, Dk)``, ``k (N, Hkv, Dk)``, ``v (N, Hkv, Dv)``, ``o (N, Hq, Dv)``; KV buffers
        ``(slots, Hkv, D)``; int32/int64 ``qo_indptr``/``kv_indptr (B + 1,)``, ``kv_indices``.
        """
        # The cache may be laid out unlike k/v: MLA's MHA form (its cache holds the latent) or a 4-D
        # shared pool. SGLang's MLA dispatch only takes the MHA form without a prefix; then the
        # cache is not read at all.
        cache_unlike_kv = k_buffer.shape[1:] != k.shape[1:] or v_buffer.shape[1:] != v.shape[1:]
        no_prefix = not any(self._prefix_lens_cpu or ())
        buffers = (None, None) if cache_unlike_kv and no_prefix else (k_buffer, v_buffer)
        reason = (
            self._unsupported(q, o, *buffers, k_descale, v_descale, options)
            or ("a cached prefix in a KV cache laid out unlike k/v" if cache_unlike_kv and not no_prefix else None)
            or ("a custom mask (speculative verify / draft extend)" if custom_mask is not None else None)
            or (None if causal else "non-causal attention (encoder-only or bidirectional layers)")
        )
        if reason is not None:
            self._fallback(reason)
            return self._dense_extend(
                q, k, v, o, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices, custom_mask, causal,
                mask_indptr, max_extend_len, k_descale, v_descale, sm_scale, **options,
            )
        layer_id = self._layer.layer_id
        factors = self._factors["prefill"].for_layer(layer_id)
        # The kernel counts into the skip counters (--blasst-stats) or, for a skipping layer, into
        # the hints' row; with both, the counters' scratch is added to the hints before it is folded.
        hints = self.prefill_hints.stats(layer_id) if factors is not None else None
        stats = self.counters.scratch if self.counters is not None else hints
        blasst_kernels.extend_attention(
            q, k, v, *buffers, qo_indptr, kv_indptr, kv_indices,
            sm_scale=sm_scale, causal=True, threshold_scale_factor=factors,
            max_extend_len=max_extend_len, stats=stats, out=o, options=self._options("prefill", q, o, layer_id),
        )
        if self.counters is not None:
            if hints is not None:
                hints.add_(stats)
            self.counters.commit("prefill", layer_id)

    def _decode_kernel(
        self, q, k_buffer, v_buffer, o, kv_indptr, kv_indices, attn_logits, attn_lse,
        num_kv_splits, max_kv_splits, sm_scale, k_descale=1.0, v_descale=1.0, **options,
    ):
        """Drop-in for SGLang's ``decode_attention_fwd`` (same arguments): BLASST, or dense fallback.

        ``q (B, Hq, Dk)``, ``o (B, Hq, Dv)``, KV buffers ``(slots, Hkv, D)``, ``kv_indptr (B + 1,)``
        (CUDA graphs: exactly ``B + 1``). SGLang's splits and workspaces (``num_kv_splits``,
        ``max_kv_splits``, ``attn_logits``, ``attn_lse``) serve its dense fallback only.
        """
        batch = q.shape[0]
        reason = (
            self._unsupported(q, o, k_buffer, v_buffer, k_descale, v_descale, options)
            or ("more query rows than requests (speculative decoding)" if kv_indptr.shape[0] != batch + 1 else None)
        )
        if reason is not None:
            self._fallback(reason)
            return self._dense_decode(
                q, k_buffer, v_buffer, o, kv_indptr, kv_indices, attn_logits, attn_lse,
                num_kv_splits, max_kv_splits, sm_scale, k_descale, v_descale, **options,
            )
        layer_id = self._layer.layer_id
        stats = self.counters.scratch if self.counters is not None else None
        blasst_kernels.decode_attention(
            q, k_buffer, v_buffer, kv_indptr, kv_indices,
            sm_scale=sm_scale, threshold_scale_factor=self._factors["decode"].for_layer(layer_id),
            num_kv_splits=self._planned_decode(q, k_buffer, v_buffer, o, kv_indptr), stats=stats, out=o,
            options=self._options("decode", q, o),
        )
        if stats is not None:
            self.counters.commit("decode", layer_id)

    def _planned_decode(self, q, k_buffer, v_buffer, o, kv_indptr) -> blasst_kernels.DecodeSplits:
        """This batch's :class:`blasst_kernels.DecodeSplits` (splits and workspaces), made by its
        first decode call and shared by the layers after it (one split-rule launch a batch,
        captured with the graph).

        SGLang's splits are not used: its workspaces hold ``--triton-attention-num-kv-splits`` (8)
        and its rule gives a batch of one 8 splits, 64 programs for 8 KV heads on an H100's 132
        SMs; BLASST's rule fills the GPU with the programs of its own decode (H100, bf16, 32/8 heads,
        d=128: ``benchmarks/NOTES.md`` v20). SGLang's splits and workspaces stay with its dense
        fallback. A plan made outside a graph capture is not reused inside one: the capture must
        record the launch that makes the splits, or replays would keep the warm-up batch's.
        """
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        shapes = (q.shape, q.dtype, k_buffer.shape[1:], v_buffer.shape[1:], capturing)
        if self._decode_plan is None or self._decode_plan[0] is not kv_indptr or self._decode_plan[1] != shapes:
            plan = blasst_kernels.plan_decode_splits(q, k_buffer, v_buffer, kv_indptr, options=self._options("decode", q, o))
            self._decode_plan = (kv_indptr, shapes, plan)
        return self._decode_plan[2]

    def _options(self, phase: str, q: torch.Tensor, o: torch.Tensor, layer_id: Optional[int] = None) -> blasst_kernels.KernelOptions:
        """Kernel options for ``phase`` at these head dims: the kernels' defaults, with the tile sizes
        a calibration was measured with when the phase's factors come from one (so the sparsity
        reached is the one targeted), and for prefill the layer's sparsity (:class:`PrefillHints`:
        measured, or the calibration's prediction until it is) as ``expected_sparsity``."""
        expected = None
        if phase == "prefill" and self.prefill_hints is not None and layer_id is not None:
            expected = self.prefill_hints.expected[layer_id]
        key = (phase, q.shape[-1], o.shape[-1], expected)
        if key not in self._option_cache:
            opts = blasst_kernels.default_options(key[1], key[2], phase)
            tiles = self._calibrated_tiles.get(phase)
            if tiles is not None:
                opts = dataclasses.replace(opts, block_m=tiles[0], block_n=tiles[1])
            self._option_cache[key] = dataclasses.replace(opts, expected_sparsity=expected)
        return self._option_cache[key]

    def _unsupported(self, q, o, k_buffer, v_buffer, k_descale, v_descale, options) -> Optional[str]:
        """Why BLASST's kernels cannot serve this call (``None`` when they can); no device sync.

        ``k_buffer``/``v_buffer`` are ``None`` for an extend that reads no cache.
        """
        layer = self._layer
        if layer is None:
            return "a kernel call outside forward_extend/forward_decode"
        if self.dcp_size > 1:
            return "decode context parallelism"
        for name, value in options.items():
            if name not in _NEUTRAL_OPTIONS and not _is_off(value):
                return f"kernel option {name}={value!r}"
        if q.dtype not in _KERNEL_DTYPES:
            return f"queries in {q.dtype}"
        if k_buffer is not None:
            if k_buffer.dtype != q.dtype or v_buffer.dtype != q.dtype:
                return f"a {k_buffer.dtype} KV cache with {q.dtype} queries (fp8 KV cache)"
            if k_descale != 1.0 or v_descale != 1.0:
                return "a scaled KV cache (k_scale / v_scale)"
            if k_buffer.dim() != 3 or v_buffer.dim() != 3:
                return f"{k_buffer.dim()}-D KV buffers (shared paged pool)"
        dims = (q.shape[-1], o.shape[-1])
        if dims not in blasst_kernels.SUPPORTED_HEAD_DIMS:
            return f"head dims (qk={dims[0]}, v={dims[1]})"
        if layer.tp_q_head_num != self.num_local_heads:
            return f"a layer with {layer.tp_q_head_num} query heads (the factor tables have {self.num_local_heads})"
        if layer.layer_id >= self.num_layers:
            return f"layer id {layer.layer_id} beyond the model's {self.num_layers} attention layers"
        return None

    def _fallback(self, reason: str) -> None:
        if reason not in self.fallbacks:
            logger.warning("BLASST: %s is not supported; such calls run SGLang's dense triton kernel", reason)
        self.fallbacks[reason] += 1
