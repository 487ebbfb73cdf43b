"""BLASST sparse attention kernels (arXiv 2512.12087): a PyTorch reference and Triton fast paths.

Pure PyTorch + Triton; no SGLang import. Installed as ``blasst_kernels``.
"""

from .api import (
    SUPPORTED_HEAD_DIMS,
    DecodeSplits,
    KernelOptions,
    decode_attention,
    default_num_kv_splits,
    default_options,
    extend_attention,
    plan_decode_splits,
    prefill_attention,
    workspace_kv_splits,
)
from .reference import ReferenceResult, TileState, decode_reference, prefill_reference
from .threshold import log_lambda, validate_scale_factor

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "DecodeSplits",
    "KernelOptions",
    "ReferenceResult",
    "TileState",
    "decode_attention",
    "decode_reference",
    "default_num_kv_splits",
    "default_options",
    "extend_attention",
    "log_lambda",
    "plan_decode_splits",
    "prefill_attention",
    "prefill_reference",
    "validate_scale_factor",
    "workspace_kv_splits",
]
