"""The Llama family's block (model.py, arch "llama") and its loader (hf/load.py): our logits
equal transformers' LlamaForCausalLM's where transformers is installed; GAST's per-sample
gradients and a step run on it."""

import json

import pytest
import torch

from hf.load import from_pretrained, llama_config
from lora import LoRAConfig, add_lora
from model import GPT, GPTConfig

PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # the paper's, in Llama's
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, vocab_size=50, rms_norm_eps=1e-5)
VARIANTS = {
    "gqa, untied head, theta 500000": dict(rope_theta=500000.0, tie_word_embeddings=False),
    "llama3 rope scaling": dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "linear rope scaling, tied head": dict(rope_scaling=dict(type="linear", factor=2.0),
                                           tie_word_embeddings=True),
    "attention bias, no gqa": dict(attention_bias=True, num_key_value_heads=4),
}


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_our_logits_equal_transformers_llama_where_installed(tmp_path, variant):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY, **VARIANTS[variant]})
    reference = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # away from the init, so every weight counts
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference.save_pretrained(tmp_path / "llama")
    ours = from_pretrained(str(tmp_path / "llama")).eval()
    idx = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx).logits
        for fused in (True, False):
            torch.testing.assert_close(ours(idx, fused=fused)[0], expected, atol=1e-5, rtol=1e-5)


def test_a_llama_config_json_is_honoured_or_refused_by_name():
    config = llama_config({"model_type": "llama", **TINY, "rope_theta": 500000.0})
    assert (config.arch, config.n_kv_head, config.rope_theta, config.n_inner) == (
        "llama", 2, 500000.0, 48)
    for bad, message in [({"sliding_window": 4096, "model_type": "mistral"}, "sliding_window"),
                         ({"hidden_act": "gelu"}, "hidden_act"),
                         ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
                         ({"some_new_field": 1}, "some_new_field"),
                         ({"rms_norm_eps": float("nan")}, "rms_norm_eps")]:
        with pytest.raises(ValueError, match=message):
            llama_config({"model_type": "llama", **TINY, **bad})


def test_bf16_weights_are_read_and_a_config_that_lies_about_its_shape_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "bf16")
    ours = from_pretrained(str(tmp_path / "bf16"))
    assert ours.transformer.wte.weight.dtype == torch.float32
    torch.testing.assert_close(ours.transformer.wte.weight,
                               reference.model.embed_tokens.weight.float())
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    (tmp_path / "bf16" / "config.json").write_text(json.dumps({**config,
                                                               "intermediate_size": 4096}))
    with pytest.raises(ValueError, match="make h.0.mlp.up_proj.weight"):
        from_pretrained(str(tmp_path / "bf16"))


def test_gast_per_sample_gradients_on_the_llama_block_are_the_batch_gradient():
    from gast import per_sample_grads_and_losses

    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                          block_size=16, vocab_size=40, n_inner=48, bias=False,
                          rope_theta=500000.0, tie_word_embeddings=False))
    add_lora(model, LoRAConfig(r=4, alpha=8, targets=PAPER_TARGETS), verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    x = torch.randint(0, 40, (5, 12))
    y = torch.randint(0, 40, (5, 12))
    grads, losses = per_sample_grads_and_losses(model, x, y)
    loss = model(x, y)[1]
    loss.backward()
    assert len(grads) == 2 * 2 * len(PAPER_TARGETS)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name].mean(0), p.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(losses, model(x, y, reduction="none")[1])


def test_the_llama_exports_load_in_peft_and_transformers_to_our_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from hf.export import export_hf, export_peft

    torch.manual_seed(0)
    variant = {**TINY, **VARIANTS["llama3 rope scaling"]}
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**variant)).save_pretrained(
        tmp_path / "base")
    ours = from_pretrained(str(tmp_path / "base"))
    lora = LoRAConfig(r=4, alpha=8, targets=PAPER_TARGETS)
    add_lora(ours, lora, verbose=False)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    ours.eval()
    idx = torch.randint(0, TINY["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ours(idx)[0]
        export_peft(ours, lora, str(tmp_path / "peft"), str(tmp_path / "base"))
        base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
        tuned = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
        torch.testing.assert_close(tuned(idx).logits, expected, atol=1e-5, rtol=1e-5)
        export_hf(ours, str(tmp_path / "merged"), eot_token=0)
        merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(idx).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(from_pretrained(str(tmp_path / "merged"))(idx)[0], expected,
                                   atol=1e-5, rtol=1e-5)
