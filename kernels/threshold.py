"""The BLASST threshold law: λ = scale_factor / L, per sequence.

A tile is negligible when every valid row has ``m̃ − m < ln λ`` (``m̃``: the row's max over the
tile, ``m``: the running max before the tile). λ shrinks as the context grows, so the same
*threshold scale factor* keeps sparsity roughly constant across lengths (arXiv 2512.12087).

Conventions used by every entry point of this package:

- ``scale_factor`` is ``None`` or ``0`` for dense attention.
- ``λ = scale_factor / kv_len`` with ``kv_len`` the KV length of *that* sequence (not the batch max).
- ``λ >= 1`` means dense for that sequence (nothing is skipped).
- A factor may be one float, or one float per query head (per-head calibration).

The kernels receive ``log λ`` per (sequence, query head), with ``-inf`` meaning "never skip".
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

ScaleFactor = Union[None, float, Sequence[float], torch.Tensor]

__all__ = ["ScaleFactor", "validate_scale_factor", "log_lambda", "is_dense"]


def validate_scale_factor(scale_factor: ScaleFactor, num_heads: int | None = None, name: str = "scale_factor") -> torch.Tensor | None:
    """Check a threshold scale factor and return it as a float64 CPU tensor (``None`` when dense).

    Accepts ``None``, a non-negative finite float, or a 1-D sequence/tensor of them with one value
    per query head (``num_heads`` long when given). Raises ``ValueError`` naming the bad value.
    """
    if scale_factor is None:
        return None
    if isinstance(scale_factor, bool):
        raise ValueError(f"{name} must be a number, got bool {scale_factor!r}")
    if isinstance(scale_factor, (int, float)):
        values = torch.tensor([float(scale_factor)], dtype=torch.float64)
    else:
        try:
            values = torch.as_tensor(scale_factor, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a float or a sequence of floats, got {scale_factor!r}") from exc
        if values.dim() != 1 or values.numel() == 0:
            raise ValueError(f"{name} must be a float or a 1-D sequence of per-head floats, got shape {tuple(values.shape)}")
        if num_heads is not None and values.numel() not in (1, num_heads):
            raise ValueError(f"{name} has {values.numel()} per-head values, expected 1 or num_heads={num_heads}")
    bad = ~torch.isfinite(values) | (values < 0)
    if bool(bad.any()):
        raise ValueError(f"{name} must be finite and >= 0 (0 or None = dense), got {values[bad][0].item()!r}")
    if bool((values == 0).all()):
        return None
    return values


def is_dense(scale_factor: ScaleFactor) -> bool:
    """True when ``scale_factor`` turns skipping off for every sequence (``None`` or all zeros)."""
    return validate_scale_factor(scale_factor) is None


def log_lambda(scale_factor: ScaleFactor, kv_lens: torch.Tensor | Sequence[int], num_heads: int) -> torch.Tensor:
    """``ln λ`` per (sequence, query head), float32, ``-inf`` where nothing may be skipped.

    Args:
        scale_factor: ``None``/``0`` (dense), a float, or ``num_heads`` floats (one per query head).
        kv_lens: ``(batch,)`` integer KV length of each sequence (prefix + new tokens).
        num_heads: number of query heads.

    Returns:
        ``(batch, num_heads)`` float32 on ``kv_lens``' device.
    """
    device = kv_lens.device if isinstance(kv_lens, torch.Tensor) else torch.device("cpu")
    lens = torch.as_tensor(kv_lens, dtype=torch.float64, device=device)
    if lens.dim() != 1:
        raise ValueError(f"kv_lens must be 1-D (batch,), got shape {tuple(lens.shape)}")
    factors = validate_scale_factor(scale_factor, num_heads)
    out = torch.full((lens.numel(), num_heads), -math.inf, dtype=torch.float64, device=device)
    if factors is None:
        return out.float()
    factors = factors.to(device).expand(num_heads)
    lam = factors[None, :] / lens.clamp(min=1)[:, None]
    skippable = (lam > 0) & (lam < 1)
    out = torch.where(skippable, torch.log(lam.clamp(min=1e-300)), out)
    return out.float()
