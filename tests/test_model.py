import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from hf.load import from_pretrained
from model import GPT, GPTConfig, IGNORE_INDEX

TINY = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY.__dict__, **overrides})).eval()


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_a_changed_future_token_never_changes_earlier_logits(data):
    model = tiny_model()
    T = data.draw(st.integers(2, TINY.block_size))
    tokens = data.draw(st.lists(st.integers(0, TINY.vocab_size - 1), min_size=T, max_size=T))
    j = data.draw(st.integers(1, T - 1))
    new = data.draw(st.integers(0, TINY.vocab_size - 1).filter(lambda t: t != tokens[j]))
    idx = torch.tensor([tokens])
    changed = idx.clone()
    changed[0, j] = new
    for fused in (True, False):
        a, _ = model(idx, fused=fused)
        b, _ = model(changed, fused=fused)
        assert torch.equal(a[:, :j], b[:, :j])
        assert not torch.allclose(a[:, j], b[:, j])


def test_fused_and_explicit_attention_agree_in_values_and_gradients():
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (3, 12))
    targets = torch.randint(0, TINY.vocab_size, (3, 12))
    targets[0, :4] = IGNORE_INDEX  # the fused path runs the head at target positions alone
    grads, losses = [], []
    for fused in (True, False):
        model.zero_grad()
        loss = model(idx, targets, fused=fused)[1]
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        losses.append(loss.detach())
    torch.testing.assert_close(*losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(idx)[0], model(idx, fused=False)[0], atol=1e-5, rtol=1e-5)
    for g_fused, g_explicit in zip(*grads):
        torch.testing.assert_close(g_fused, g_explicit, atol=1e-5, rtol=1e-4)


def test_loss_is_the_mean_of_per_sample_mean_token_losses():
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (3, 8))
    targets = torch.randint(0, TINY.vocab_size, (3, 8))
    targets[0, :5] = IGNORE_INDEX  # a prompt: 3 target tokens
    targets[1, 6:] = IGNORE_INDEX  # padding: 6 target tokens
    logits, loss = model(idx)[0], model(idx, targets)[1]
    _, losses = model(idx, targets, reduction="none")
    torch.testing.assert_close(model(idx, targets, reduction="none", fused=False)[1], losses)
    assert losses.shape == (3,)
    logp = torch.log_softmax(logits, dim=-1)
    expected = []
    for i in range(3):
        keep = targets[i] != IGNORE_INDEX
        expected.append(-logp[i, keep].gather(1, targets[i, keep][:, None]).mean())
    torch.testing.assert_close(losses, torch.stack(expected))
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    # the token-weighted mean would differ: samples of different length weigh the same
    token_mean = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets,
                                                   ignore_index=IGNORE_INDEX)
    assert not torch.allclose(loss, token_mean)


def test_per_sample_loss_of_padding_does_not_depend_on_pad_tokens():
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (1, 10))
    targets = idx.roll(-1, 1)
    targets[0, 6:] = IGNORE_INDEX
    other = idx.clone()
    other[0, 7:] = 0  # different padding after the last target position
    assert torch.equal(model(idx, targets, reduction="none")[1],
                       model(other, targets, reduction="none")[1])


def test_greedy_generate_follows_the_argmax_and_stops():
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (2, 3))
    out = model.generate(idx.tolist(), 5, temperature=0)
    assert [len(r) for r in out] == [5, 5]
    full = torch.cat((idx, torch.tensor(out)), dim=1)
    for t in range(3, 8):  # each token the argmax of a whole forward pass without a cache
        logits, _ = model(full[:, :t])
        assert torch.equal(logits[:, -1].argmax(-1), full[:, t])
    first = out[0][0]
    assert model.generate(idx[:1].tolist(), 5, temperature=0, stop_token=first) == [[]]
    # sampled at a temperature this low, the softmax is the argmax's: greedy again
    assert model.generate(idx.tolist(), 4, temperature=1e-4) == [r[:4] for r in out]
    # never past the context: the longest prompt leaves block_size - 3 slots
    assert len(model.generate([idx[0].tolist()], 1000, temperature=0)[0]) == TINY.block_size - 3
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[]], 3)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prompts_of_any_lengths_batched_answer_as_each_alone(arch):
    """Left padding, each row's own positions and the cache's mask: a batch of prompts of
    different lengths gets, row by row, the answer each prompt gets alone, and each row
    stops at its own end token."""
    torch.manual_seed(0)
    config = GPTConfig(arch=arch, n_kv_head=2 if arch == "llama" else 0, block_size=40,
                       vocab_size=50, bias=arch == "gpt2")
    model = GPT(config).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (3, 9, 5, 1, 12, 7)]
    alone = [model.generate([p], 12, temperature=0)[0] for p in prompts]
    assert model.generate(prompts, 12, temperature=0) == alone
    # a row near the context's end has less room (40 - 38 tokens); the others keep theirs
    near = torch.randint(0, 50, (38,), generator=g).tolist()
    last = model.generate([near], 12, temperature=0)[0]
    assert len(last) == 2 and model.generate(prompts + [near], 12, temperature=0) == alone + [last]
    stop = alone[1][2]  # row 1 ends before its third token; the others where it appears
    cut = [r[: r.index(stop)] if stop in r else r for r in alone]
    assert model.generate(prompts, 12, temperature=0, stop_token=stop) == cut


def write_hf_checkpoint(model, directory, prefix="", with_config=True):
    """Write model's weights the way Hugging Face's GPT-2 stores them (Conv1D, buffers)."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        k = k.removeprefix("transformer.")
        sd[prefix + k] = v.t().contiguous() if k.endswith(conv1d) else v.clone()
    c = model.config
    for i in range(c.n_layer):
        sd[f"{prefix}h.{i}.attn.bias"] = torch.tril(
            torch.ones(c.block_size, c.block_size)).view(1, 1, c.block_size, c.block_size)
    if prefix:
        sd["lm_head.weight"] = model.lm_head.weight.clone()
    torch.save(sd, directory / "pytorch_model.bin")
    if with_config:
        (directory / "config.json").write_text(json.dumps(dict(
            n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.block_size,
            vocab_size=c.vocab_size)))


@pytest.mark.parametrize("prefix,with_config", [("", True), ("transformer.", True)])
def test_from_pretrained_maps_a_gpt2_layout_checkpoint_exactly(tmp_path, prefix, with_config):
    source = tiny_model(seed=3, n_embd=128, n_head=2)  # 64-dim heads, as every GPT-2 size has
    write_hf_checkpoint(source, tmp_path, prefix, with_config)
    loaded = from_pretrained(str(tmp_path)).eval()
    assert loaded.config == source.config
    for (k, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    idx = torch.randint(0, TINY.vocab_size, (2, 9))
    assert torch.equal(source(idx)[0], loaded(idx)[0])
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_from_pretrained_names_the_file_on_a_shape_mismatch_or_missing_file(tmp_path):
    source = tiny_model(n_embd=128, n_head=2)
    write_hf_checkpoint(source, tmp_path)
    sd = torch.load(tmp_path / "pytorch_model.bin")
    sd["h.1.mlp.c_fc.weight"] = sd["h.1.mlp.c_fc.weight"][:, :-1]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: h.1.mlp.c_fc.weight has shape"):
        from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no GPT-2 checkpoint"):
        from_pretrained(str(tmp_path / "nowhere"))
