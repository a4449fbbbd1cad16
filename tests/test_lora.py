import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from lora import (LoRAConfig, LoRALinear, add_lora, load_adapter, lora_modules,
    lora_names_by_block, merge_lora, adapter_file)
from methods.tuner import scaled_adapters
from model import GPT, GPTConfig

ATTENTION = ("attn.c_attn", "attn.c_proj")  # the adapters these tests were written for

TINY = GPTConfig(block_size=16, vocab_size=50, n_layer=3, n_head=2, n_embd=16)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(TINY)


def randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_fresh_adapters_leave_the_logits_exactly_unchanged():
    model = tiny_model().eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    before = model(idx)[0]
    add_lora(model, LoRAConfig(
        r=4, targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")), verbose=False)
    assert all(torch.all(m.lora_B == 0) and torch.any(m.lora_A != 0) for m in lora_modules(model))
    assert torch.equal(model(idx)[0], before)


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 8), alpha=st.floats(0.5, 64), n_in=st.integers(1, 24),
       n_out=st.integers(1, 24), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_merged_equals_unmerged_and_merge_is_idempotent(r, alpha, n_in, n_out, bias, seed):
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=bias).double()
    layer = LoRALinear(base, r, alpha)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(5, n_in, dtype=torch.double)
    w0 = layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    layer.merge()  # a second merge changes nothing
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(layer.weight, w0 + alpha / r * layer.lora_B @ layer.lora_A)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0)
    torch.testing.assert_close(layer(x), y)


def test_eval_and_train_never_merge():
    model = tiny_model()
    add_lora(model, LoRAConfig(targets=ATTENTION), verbose=False)
    model.eval()
    model.train()
    assert not any(m.merged for m in lora_modules(model))
    randomise_adapters(model)
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    y = model.eval()(idx)[0]
    merge_lora(model)
    torch.testing.assert_close(model(idx)[0], y, atol=1e-5, rtol=1e-5)
    for m in lora_modules(model):
        m.unmerge()
    torch.testing.assert_close(model(idx)[0], y, atol=1e-5, rtol=1e-5)


def test_only_lora_parameters_train_and_a_step_leaves_base_weights_bit_identical(capsys):
    model = tiny_model()
    add_lora(model, LoRAConfig(
        r=2, targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head")))
    printed = capsys.readouterr().out
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert not isinstance(model.lm_head, LoRALinear)  # tied to the embedding: never adapted
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"{n_trainable:,} trainable" in printed
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1,
                            weight_decay=0.1)
    idx = torch.randint(0, TINY.vocab_size, (4, 10))
    for _ in range(2):
        loss = model(idx, idx)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base[n]), n
    assert any(torch.any(m.lora_B != 0) for m in lora_modules(model))


def test_state_dict_keeps_gpt2_names_so_a_base_checkpoint_loads():
    model = tiny_model()
    base_sd = model.state_dict()
    add_lora(model, LoRAConfig(targets=ATTENTION), verbose=False)
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert not unexpected and missing and all(".lora_" in k for k in missing)


def test_lora_names_by_block_group_parameters_by_block():
    model = tiny_model()
    add_lora(model, LoRAConfig(targets=("attn.c_attn", "mlp.c_fc")), verbose=False)
    groups = lora_names_by_block(model)
    assert len(groups) == TINY.n_layer
    for i, names in enumerate(groups):
        assert sorted(names) == sorted(
            f"transformer.h.{i}.{m}.lora_{ab}" for m in ("attn.c_attn", "mlp.c_fc") for ab in "AB")


def test_adapter_save_load_round_trips(tmp_path):
    model = tiny_model()
    config = LoRAConfig(r=3, alpha=6.0, targets=("attn.c_attn", "mlp.c_proj"))
    add_lora(model, config, verbose=False)
    randomise_adapters(model)
    torch.save(adapter_file(model, config), tmp_path / "adapter.pt")
    size = (tmp_path / "adapter.pt").stat().st_size
    assert size < sum(p.numel() for p in model.parameters()) * 4  # the adapter alone
    fresh = tiny_model()  # same base weights, no adapters yet
    assert load_adapter(fresh, tmp_path / "adapter.pt") == config
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    assert torch.equal(model.eval()(idx)[0], fresh.eval()(idx)[0])
    other = tiny_model()
    add_lora(other, LoRAConfig(r=5, targets=ATTENTION), verbose=False)
    with pytest.raises(ValueError, match="adapter.pt"):
        load_adapter(other, tmp_path / "adapter.pt")


def test_scaled_adapters_scale_only_the_named_blocks_and_restore():
    model = tiny_model()
    add_lora(model, LoRAConfig(r=4, alpha=8, targets=ATTENTION), verbose=False)
    with scaled_adapters(model, [1], 0.25):
        scalings = {n: m.scaling for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert all(s == (0.5 if ".h.1." in n else 2.0) for n, s in scalings.items())
    assert all(m.scaling == 2.0 for m in lora_modules(model))
