"""BLASST inside Hugging Face transformers models, without editing model code.

An attention function named ``"blasst"`` is registered with transformers' ``AttentionInterface``;
:func:`blasst_attention` switches a model to it for the duration of a ``with`` block and returns a
:class:`Recording` of the skip maps::

    with blasst_attention(model, BlasstSettings(scale_factor=8.0, record=True)) as rec:
        model.generate(ids, max_new_tokens=20)
    rec.sparsity("prefill")   # (num_layers, num_heads)

Each attention call runs one sequence (batch 1, no padding):

- query length 1 over a longer KV (a generation step): decode, all query heads of a KV group
  decide together (:func:`blasst_kernels.decode_reference` / ``decode_attention``);
- otherwise prefill/extend with ``prefix_len = kv_len − q_len``
  (:func:`blasst_kernels.prefill_reference` / ``extend_attention``).

On CPU the reference runs in float32; on CUDA the Triton kernels run. Dense calls that record
nothing use PyTorch's SDPA. ``λ = factor / kv_len`` per call (see :mod:`blasst_kernels.threshold`).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from blasst_kernels import TileState, default_options, log_lambda, validate_scale_factor
from blasst_kernels.reference import decode_reference, decode_tile_of_head, prefill_reference, prefill_skip_sweep

__all__ = ["ATTENTION_NAME", "BlasstSettings", "Recording", "attention_modules", "blasst_attention", "layer_scale_factors"]

#: The name registered in transformers' AttentionInterface.
ATTENTION_NAME = "blasst"

#: Query tokens per reference call on CPU (rounded to whole tiles); see :func:`_prefill`.
_QUERY_CHUNK = 512

LayerScaleFactor = Union[None, float, Sequence[float], torch.Tensor]


@dataclass
class BlasstSettings:
    """How :func:`blasst_attention` runs attention.

    Attributes:
        scale_factor: prefill threshold scale factor: ``None``/``0`` (dense), one float for every
            layer, a sequence with one entry per layer (each ``None``, a float, or per-head floats),
            or a ``(num_layers, num_heads)`` tensor.
        decode_scale_factor: the same for generation steps.
        block_m, block_n: prefill tile sizes (query rows, keys).
        decode_block_n: keys per decode tile; decode_splits: KV splits per decode step.
        record: keep every call's tile_state (int8, CPU) in the :class:`Recording`.
        sweep_log_lams: optional ``(S,)`` float grid of ln λ. Attention then stays dense, and each
            prefill call records :func:`~blasst_kernels.reference.prefill_skip_sweep` maps.
    """

    scale_factor: LayerScaleFactor = None
    decode_scale_factor: LayerScaleFactor = None
    block_m: int = 64
    block_n: int = 64
    decode_block_n: int = 64
    decode_splits: int = 1
    record: bool = False
    sweep_log_lams: Optional[torch.Tensor] = None

    def __post_init__(self):
        for name in ("block_m", "block_n", "decode_block_n", "decode_splits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.sweep_log_lams is not None:
            lams = torch.as_tensor(self.sweep_log_lams, dtype=torch.float32)
            if lams.dim() != 1 or lams.numel() == 0:
                raise ValueError(f"sweep_log_lams must be a non-empty 1-D (S,) tensor of ln λ, got shape {tuple(lams.shape)}")
            if bool(torch.isnan(lams).any()):
                raise ValueError(f"sweep_log_lams has NaN: {lams.tolist()}")
            if self.scale_factor is not None or self.decode_scale_factor is not None:
                raise ValueError(
                    "sweep_log_lams keeps attention dense: leave scale_factor and decode_scale_factor at None "
                    f"(got {self.scale_factor!r} / {self.decode_scale_factor!r})"
                )
            self.sweep_log_lams = lams


@dataclass
class Recording:
    """Skip maps recorded by :func:`blasst_attention` (CPU int8 :class:`~blasst_kernels.TileState`).

    Attributes:
        num_layers, num_heads: of the model (query heads).
        num_kv_heads: of the model; ``None``: as many as a decode map has rows.
        prefill: layer -> one ``(Hq, NQ, T)`` map per prefill call.
        decode: layer -> one ``(G, T)`` map per decode step: a row per decode tile of heads, ``G =
            Hkv`` unless a KV group has more than 16 query heads
            (:func:`blasst_kernels.reference.decode_tile_of_head`).
        sweeps: layer -> one ``(S, Hq, NQ, T)`` map per prefill call (``sweep_log_lams`` only).
    """

    num_layers: int
    num_heads: int
    num_kv_heads: Optional[int] = None
    prefill: Dict[int, List[torch.Tensor]] = field(default_factory=dict)
    decode: Dict[int, List[torch.Tensor]] = field(default_factory=dict)
    sweeps: Dict[int, List[torch.Tensor]] = field(default_factory=dict)

    def sparsity(self, phase: str = "prefill") -> torch.Tensor:
        """Skipped over visited tiles, all calls of ``phase`` added up.

        Returns:
            float32 ``(num_layers, num_heads)``; NaN for layers with no recorded call. Decode maps are
            per decode tile of heads: each query head gets its tile's value.
        """
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        maps = self.prefill if phase == "prefill" else self.decode
        out = torch.full((self.num_layers, self.num_heads), math.nan)
        for layer, states in maps.items():
            skipped = sum(_count(s, TileState.SKIPPED) for s in states)
            visited = skipped + sum(_count(s, TileState.COMPUTED) for s in states)
            ratio = skipped / visited.clamp(min=1)
            if phase == "decode":
                ratio = ratio[decode_tile_of_head(self.num_heads, self.num_kv_heads or ratio.numel())]
            out[layer] = ratio
        return out

    def sweep_sparsity(self) -> torch.Tensor:
        """Sparsity per threshold of the sweep: float32 ``(S, num_layers, num_heads)``, NaN for
        layers with no recorded call."""
        if not self.sweeps:
            raise ValueError("no sweep recorded: set BlasstSettings.sweep_log_lams")
        num_s = next(iter(self.sweeps.values()))[0].shape[0]
        out = torch.full((num_s, self.num_layers, self.num_heads), math.nan)
        for layer, states in self.sweeps.items():
            skipped = sum(_count(s, TileState.SKIPPED) for s in states)
            visited = skipped + sum(_count(s, TileState.COMPUTED) for s in states)
            out[:, layer] = skipped / visited.clamp(min=1)
        return out


def _count(state: torch.Tensor, value: TileState) -> torch.Tensor:
    """Tiles equal to ``value`` per leading index, summed over the last two dims (or the last for 2-D maps)."""
    dims = (-1,) if state.dim() == 2 else (-2, -1)
    return (state == int(value)).sum(dims).float()


def layer_scale_factors(value: LayerScaleFactor, num_layers: int, num_heads: int, name: str) -> List[Optional[torch.Tensor]]:
    """Validate ``value`` (see :attr:`BlasstSettings.scale_factor`) and return one factor per layer:
    ``None`` (dense) or a float64 ``(1,)``/``(num_heads,)`` CPU tensor. ``name`` is used in errors."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 2:
            if tuple(value.shape) != (num_layers, num_heads):
                raise ValueError(
                    f"Invalid shape of {name}: expected ({num_layers}, {num_heads}) = (layers, heads), got {tuple(value.shape)}"
                )
            return [validate_scale_factor(row, num_heads, f"{name}[{i}]") for i, row in enumerate(value)]
        if value.dim() > 2:
            raise ValueError(f"Invalid shape of {name}: expected a float, (layers,) or (layers, heads), got {tuple(value.shape)}")
        value = value.item() if value.dim() == 0 else value.tolist()
    if value is None or isinstance(value, (int, float)):
        return [validate_scale_factor(value, num_heads, name)] * num_layers
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be None, a float, one entry per layer, or a (layers, heads) tensor; got {value!r}")
    if len(value) != num_layers:
        raise ValueError(f"{name} has {len(value)} entries, expected one per layer ({num_layers})")
    return [validate_scale_factor(v, num_heads, f"{name}[{i}]") for i, v in enumerate(value)]


@dataclass
class _Session:
    """What the attention function needs for one model inside :func:`blasst_attention`."""

    settings: BlasstSettings
    prefill_factors: List[Optional[torch.Tensor]]
    decode_factors: List[Optional[torch.Tensor]]
    recording: Recording


#: attention module -> the session of the ``with`` block it is in (the model itself is not touched).
_SESSIONS: "weakref.WeakKeyDictionary[torch.nn.Module, _Session]" = weakref.WeakKeyDictionary()


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, causal: bool) -> torch.Tensor:
    """Dense attention of one sequence. q ``(1, Hq, E, D)``, k/v ``(1, Hkv, P+E, D)`` -> ``(1, Hq, E, Dv)``."""
    e, length = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    mask = None
    if causal and e > 1:
        # New token i sits at position P + i: bottom-right aligned (SDPA's is_causal is top-left).
        mask = torch.ones(e, length, dtype=torch.bool, device=q.device).tril(diagonal=length - e)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)


def _prefill(q, k, v, prefix_len: int, scaling: float, causal: bool, factor, settings: BlasstSettings, record: bool):
    """One prefill/extend call. q ``(E, Hq, D)``, k/v ``(P+E, Hkv, D)`` -> (out ``(E, Hq, Dv)``, map or None)."""
    if q.device.type == "cuda":
        from blasst_kernels import extend_attention

        e, p, dev = q.shape[0], prefix_len, q.device
        i32 = dict(dtype=torch.int32, device=dev)
        out = extend_attention(
            q.contiguous(), k[p:].contiguous(), v[p:].contiguous(),
            k[:p].contiguous() if p else None, v[:p].contiguous() if p else None,
            torch.tensor([0, e], **i32), torch.tensor([0, p], **i32), torch.arange(p, **i32),
            sm_scale=scaling, causal=causal, threshold_scale_factor=factor, max_extend_len=e,
            return_skip_map=record,
            options=dataclasses.replace(
                default_options(q.shape[-1], v.shape[-1], "prefill"), block_m=settings.block_m, block_n=settings.block_n
            ),
        )
        return (out[0], out[1][0].cpu()) if record else (out, None)
    e, hq = q.shape[:2]
    bm, bn = settings.block_m, settings.block_n
    log_lam = log_lambda(factor, [k.shape[0]], hq)[0]
    # Causal calls go in query chunks, each over the keys it can see: the same tiles and decisions
    # as one call (tiles start at 0 and at whole chunks), without the masked upper triangle.
    # Needs tile-aligned chunk starts: a prefix of whole key tiles.
    chunk = math.lcm(bm, bn) * max(1, _QUERY_CHUNK // math.lcm(bm, bn))
    if not causal or prefix_len % bn:
        chunk = e
    num_q = -(-e // bm)
    tiles = -(-prefix_len // bn) + -(-e // bn)
    outs, state = [], torch.zeros(hq, num_q, tiles, dtype=torch.int8)
    for start in range(0, e, chunk):
        stop = min(start + chunk, e)
        res = prefill_reference(
            q[start:stop], k[: prefix_len + stop], v[: prefix_len + stop], prefix_len=prefix_len + start,
            sm_scale=scaling, log_lam=log_lam, causal=causal, block_m=bm, block_n=bn, compute_dtype=torch.float32,
        )
        outs.append(res.out)
        state[:, start // bm: start // bm + res.tile_state.shape[1], : res.tile_state.shape[2]] = res.tile_state
    return torch.cat(outs), state


def _decode(q, k, v, scaling: float, factor, settings: BlasstSettings, record: bool):
    """One generation step. q ``(Hq, D)``, k/v ``(L, Hkv, D)`` -> (out ``(Hq, Dv)``, ``(G, T)`` map or None)."""
    if q.device.type == "cuda":
        from blasst_kernels import decode_attention

        length, dev = k.shape[0], q.device
        opts = dataclasses.replace(default_options(q.shape[-1], v.shape[-1], "decode"), block_n=settings.decode_block_n)
        out = decode_attention(
            q[None].contiguous(), k.contiguous(), v.contiguous(),
            torch.tensor([0, length], dtype=torch.int32, device=dev), torch.arange(length, dtype=torch.int32, device=dev),
            sm_scale=scaling, threshold_scale_factor=factor,
            num_kv_splits=torch.tensor([settings.decode_splits], dtype=torch.int32, device=dev),
            max_kv_splits=settings.decode_splits, return_skip_map=record, options=opts,
        )
        return (out[0][0], out[1][0].cpu()) if record else (out[0], None)
    log_lam = log_lambda(factor, [k.shape[0]], q.shape[0])[0]
    res = decode_reference(
        q, k, v, sm_scale=scaling, log_lam=log_lam, block_n=settings.decode_block_n,
        num_splits=settings.decode_splits, compute_dtype=torch.float32,
    )
    return res.out, res.tile_state


def blasst_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
):
    """The function registered as ``"blasst"`` (transformers' attention-function signature).

    Args:
        module: the attention module (its ``layer_idx`` picks the layer's factor).
        query: ``(1, Hq, E, D)``; key, value: ``(1, Hkv, P + E, D)`` / ``(1, Hkv, P + E, Dv)`` (cache included).
        attention_mask: ignored; transformers builds none for an unregistered mask type, and
            batch 1 needs none (causality is applied here).
        scaling: softmax scale (default ``1/sqrt(D)``).

    Returns:
        ``(out (1, E, Hq, Dv), None)`` in ``query``'s dtype.
    """
    session = _SESSIONS.get(module)
    if session is None:
        raise RuntimeError(f"attention '{ATTENTION_NAME}' runs only inside `with blasst_attention(model, settings):`")
    if query.shape[0] != 1:
        raise ValueError(f"blasst attention runs one sequence at a time (batch 1, no padding), got batch {query.shape[0]}")
    if dropout:
        raise ValueError(f"attention dropout is not supported, got {dropout} (call model.eval())")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(
            f"sliding-window attention is not supported (layer {module.layer_idx}, window {kwargs['sliding_window']})"
        )
    layer = module.layer_idx
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    settings, rec = session.settings, session.recording
    e, length = query.shape[2], key.shape[2]
    q = query[0].transpose(0, 1)  # (E, Hq, D)
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # (L, Hkv, D)
    decode = e == 1 and length > 1
    factor = (session.decode_factors if decode else session.prefill_factors)[layer]
    if settings.sweep_log_lams is not None and not decode:
        rec.sweeps.setdefault(layer, []).append(prefill_skip_sweep(
            q.float(), k.float(), settings.sweep_log_lams.to(q.device), prefix_len=length - e, sm_scale=scaling,
            causal=causal, block_m=settings.block_m, block_n=settings.block_n,
        ).cpu())
    if factor is None and not settings.record:
        return _dense(query, key, value, scaling, causal).transpose(1, 2), None
    if decode:
        out, state = _decode(q[0], k, v, scaling, factor, settings, settings.record)
        out = out[None]
    else:
        out, state = _prefill(q, k, v, length - e, scaling, causal, factor, settings, settings.record)
    if settings.record:
        (rec.decode if decode else rec.prefill).setdefault(layer, []).append(state.cpu())
    return out[None].to(query.dtype), None


def _register() -> None:
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, blasst_attention_forward)


def attention_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The self-attention modules of a transformers model (those with an int ``layer_idx`` and GQA
    groups), in layer order; raises ``ValueError`` when there are none."""
    found = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "num_key_value_groups")]
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention modules with a layer_idx: not an AttentionInterface model")
    return sorted(found, key=lambda m: m.layer_idx)


@contextmanager
def blasst_attention(model: torch.nn.Module, settings: BlasstSettings) -> Iterator[Recording]:
    """Run ``model`` with BLASST attention inside the block; yields the :class:`Recording`.

    ``model`` is a transformers ``PreTrainedModel`` whose attention goes through the
    AttentionInterface (Llama, Qwen2, Mistral, ...). Its previous attention implementation is
    restored on exit. Each attention module must carry an int ``layer_idx``.
    """
    if not isinstance(settings, BlasstSettings):
        raise ValueError(f"settings must be a BlasstSettings, got {type(settings).__name__}")
    config = model.config.get_text_config()
    num_layers, num_heads = config.num_hidden_layers, config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    attn_modules = attention_modules(model)
    if any(m in _SESSIONS for m in attn_modules):
        raise RuntimeError(f"{type(model).__name__} is already inside blasst_attention(); blocks cannot nest")
    session = _Session(
        settings,
        layer_scale_factors(settings.scale_factor, num_layers, num_heads, "scale_factor"),
        layer_scale_factors(settings.decode_scale_factor, num_layers, num_heads, "decode_scale_factor"),
        Recording(num_layers, num_heads, num_kv_heads),
    )
    _register()
    previous = model.config._attn_implementation
    for m in attn_modules:
        _SESSIONS[m] = session
    try:
        model.set_attn_implementation(ATTENTION_NAME)
        yield session.recording
    finally:
        model.set_attn_implementation(previous)
        for m in attn_modules:
            _SESSIONS.pop(m, None)
