"""Real checkpoints in and out: Hugging Face's GPT-2 layout read (safetensors, sharded,
pytorch_model.bin) with every config.json field honoured or refused, held to a reference
GPT-2 forward pass written here from the model's definition; exports to PEFT and HF."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf.load import from_pretrained, hf_config

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BASE = dict(n_layer=2, n_head=2, n_embd=16, n_positions=12, vocab_size=40)


def random_hf_weights(hf, seed=0):
    """A randomly initialised GPT2LMHeadModel state dict in HF's names and Conv1D layout."""
    g = torch.Generator().manual_seed(seed)
    d, inner = hf["n_embd"], hf.get("n_inner") or 4 * hf["n_embd"]
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3
    sd = {"transformer.wte.weight": r(hf["vocab_size"], d),
          "transformer.wpe.weight": r(hf["n_positions"], d)}
    for i in range(hf["n_layer"]):
        p = f"transformer.h.{i}."
        sd |= {p + "ln_1.weight": 1 + r(d), p + "ln_1.bias": r(d), p + "ln_2.weight": 1 + r(d),
               p + "ln_2.bias": r(d), p + "attn.c_attn.weight": r(d, 3 * d),
               p + "attn.c_attn.bias": r(3 * d), p + "attn.c_proj.weight": r(d, d),
               p + "attn.c_proj.bias": r(d), p + "mlp.c_fc.weight": r(d, inner),
               p + "mlp.c_fc.bias": r(inner), p + "mlp.c_proj.weight": r(inner, d),
               p + "mlp.c_proj.bias": r(d)}
    sd |= {"transformer.ln_f.weight": 1 + r(d), "transformer.ln_f.bias": r(d)}
    if hf.get("tie_word_embeddings", True) is False:
        sd["lm_head.weight"] = r(hf["vocab_size"], d)
    return sd


def reference_logits(sd, hf, idx):
    """GPT-2's forward pass as Hugging Face defines it, from the HF state dict itself."""
    eps = hf.get("layer_norm_epsilon", 1e-5)
    act = {
        "gelu_new": lambda x: (
            0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        ),
        "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
        "relu": torch.relu,
    }[hf.get("activation_function", "gelu_new")]
    ln = lambda x, p: torch.nn.functional.layer_norm(x, x.shape[-1:], sd[p + ".weight"],
                                                     sd[p + ".bias"], eps)
    T, d, nh = idx.shape[1], hf["n_embd"], hf["n_head"]
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    for i in range(hf["n_layer"]):
        p = f"transformer.h.{i}."
        q, k, v = (ln(
            x, p + "ln_1") @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]).split(d, -1)
        heads = lambda t: t.view(1, T, nh, d // nh).transpose(1, 2)
        att = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d // nh)
        if hf.get("scale_attn_by_inverse_layer_idx"):
            att = att / (i + 1)
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        y = (att.softmax(-1) @ heads(v)).transpose(1, 2).reshape(1, T, d)
        x = x + y @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        h = act(ln(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
    head = sd.get("lm_head.weight", sd["transformer.wte.weight"])
    return ln(x, "transformer.ln_f") @ head.t()


def write_checkpoint(directory, hf, sd, kind="safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", **hf}))
    if kind == "safetensors":
        save_file(sd, str(directory / "model.safetensors"))
    elif kind == "sharded":
        names = sorted(sd)
        half = {"model-00001-of-00002.safetensors": names[::2],
                "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in half.items():
            save_file({k: sd[k] for k in keys}, str(directory / file))
        index = {"weight_map": {k: f for f, keys in half.items() for k in keys}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        torch.save(sd, directory / "pytorch_model.bin")
    return directory


VARIANTS = [{}, {"tie_word_embeddings": False}, {"scale_attn_by_inverse_layer_idx": True},
            {"layer_norm_epsilon": 1e-2}, {"activation_function": "gelu"},
            {"activation_function": "relu"}, {"n_inner": 24}]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(v) or "gpt2")
@pytest.mark.parametrize("kind", ["safetensors", "sharded", "bin"])
def test_our_logits_equal_the_reference_forward_for_every_supported_variant(tmp_path, variant,
                                                                            kind):
    hf = {**BASE, **variant}
    sd = random_hf_weights(hf)
    model = from_pretrained(str(write_checkpoint(tmp_path / "gpt2", hf, sd, kind))).eval()
    idx = torch.randint(0, hf["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(1))
    expected = reference_logits(sd, hf, idx)
    for fused in (True, False):
        torch.testing.assert_close(model(idx, fused=fused)[0], expected, atol=2e-5, rtol=1e-5)
    assert (
        model.lm_head.weight is model.transformer.wte.weight) == hf.get("tie_word_embeddings", True)


@pytest.mark.parametrize("field,value", [
    ("reorder_and_upcast_attn", True), ("add_cross_attention", True), ("scale_attn_weights", False),
    ("activation_function", "quick_gelu"), ("model_type", "llama"), ("rotary_dim", 8)])
def test_a_config_field_we_cannot_honour_is_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field if field != "model_type" else "llama"):
        hf_config({**BASE, field: value})


def test_the_dropouts_and_bookkeeping_of_config_json_are_ignored():
    hub = {**BASE, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "n_ctx": 12,
           "architectures": ["GPT2LMHeadModel"], "bos_token_id": 50256,
           "transformers_version": "5.0"}
    assert hf_config(hub).dropout == 0.0  # fine-tuning runs the base without dropout


def test_a_folder_without_weights_names_both_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        from_pretrained(str(tmp_path))


# --- out: PEFT's adapter layout and a transformers GPT-2 directory ---


@pytest.fixture
def tuned_run(tmp_path):
    """A tiny LoRA run on a GPT-2 checkpoint of the byte tokenizer's vocabulary."""
    from train import main

    hf = {**BASE, "vocab_size": 257, "n_positions": 32}
    base = write_checkpoint(tmp_path / "gpt2", hf, random_hf_weights(hf))
    rows = [{"prompt": f"q{i}=", "completion": f"a{i % 3}"} for i in range(40)]
    (tmp_path / "qa.jsonl").write_text("\n".join(map(json.dumps, rows)))
    out = tmp_path / "run"
    flags = ["--init-from", str(base), "--data", str(tmp_path / "qa.jsonl"), "--out-dir", str(out)]
    flags += ["--steps", "3", "--batch-size", "8", "--lora-r", "4", "--lr", "0.05", "--quiet"]
    assert main([*flags, "--no-picture", "--method", "lora"]) == 0
    return out, hf, tmp_path


def adapted_logits(out, idx):
    from sample import load_run

    model, _ = load_run(str(out), "cpu")
    return model.eval()(idx)[0]


def test_export_peft_writes_peft_s_lora_layout_and_it_gives_our_logits(tuned_run):
    import sample

    out, hf, tmp = tuned_run
    assert sample.main(["--out-dir", str(out), "--export-peft", str(tmp / "peft")]) == 0
    config = json.loads((tmp / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"
    targets = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert config["target_modules"] == sorted(targets)
    tensors = load_file(str(tmp / "peft" / "adapter_model.safetensors"))
    d = hf["n_embd"]
    widths = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, 4 * d),
              "mlp.c_proj": (4 * d, d)}
    assert len(tensors) == 2 * len(targets) * hf["n_layer"]
    for i in range(hf["n_layer"]):
        for target, (n_in, n_out) in widths.items():
            name = f"base_model.model.transformer.h.{i}.{target}"
            assert tensors[name + ".lora_A.weight"].shape == (4, n_in)
            assert tensors[name + ".lora_B.weight"].shape == (n_out, 4)
            assert tensors[name + ".lora_A.weight"].dtype == torch.float32
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # it learnt
    # PEFT's arithmetic on the Conv1D base: W += (B A)^T * alpha / r
    base = load_file(str(tmp / "gpt2" / "model.safetensors"))
    for i in range(hf["n_layer"]):
        for target in targets:
            name = f"base_model.model.transformer.h.{i}.{target}"
            delta = tensors[name + ".lora_B.weight"] @ tensors[name + ".lora_A.weight"]
            base[f"transformer.h.{i}.{target}.weight"] += delta.t() * config["lora_alpha"] / 4
    idx = torch.randint(0, 257, (1, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(adapted_logits(out, idx), reference_logits(base, hf, idx), atol=2e-5,
                               rtol=1e-5)


def test_export_hf_writes_a_gpt2_directory_that_loads_back_to_our_logits(tuned_run):
    import sample

    out, hf, tmp = tuned_run
    assert sample.main(["--out-dir", str(out), "--export-hf", str(tmp / "merged")]) == 0
    config = json.loads((tmp / "merged" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["n_embd"] == hf["n_embd"] and config["tie_word_embeddings"] is True
    weights = load_file(str(tmp / "merged" / "model.safetensors"))
    d = hf["n_embd"]
    assert weights["transformer.h.0.attn.c_attn.weight"].shape == (d, 3 * d)  # Conv1D: (in, out)
    assert weights["transformer.h.0.mlp.c_proj.weight"].shape == (4 * d, d)
    assert not any(".lora_" in k for k in weights) and "lm_head.weight" not in weights
    idx = torch.randint(0, 257, (1, 9), generator=torch.Generator().manual_seed(3))
    merged = from_pretrained(str(tmp / "merged")).eval()
    torch.testing.assert_close(merged(idx)[0], adapted_logits(out, idx), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(merged(idx)[0], reference_logits(weights, hf, idx), atol=2e-5,
                               rtol=1e-5)
    # a folder that holds files is never written over
    assert sample.main(["--out-dir", str(out), "--export-hf", str(tmp / "merged")]) == 2


def test_peft_and_transformers_load_the_exports_where_installed(tuned_run):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import sample

    out, hf, tmp = tuned_run
    assert sample.main(["--out-dir", str(out), "--export-peft", str(tmp / "peft")]) == 0
    base = transformers.GPT2LMHeadModel.from_pretrained(str(tmp / "gpt2"))
    tuned = peft.PeftModel.from_pretrained(base, str(tmp / "peft")).eval()
    idx = torch.randint(0, 257, (1, 9), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(tuned(idx).logits, adapted_logits(out, idx), atol=1e-4, rtol=1e-4)


def test_a_byte_tokenizer_on_a_gpt2_sized_vocabulary_is_refused_before_any_work(tmp_path, capsys):
    from train import main

    hf = {**BASE, "vocab_size": 300}
    base = write_checkpoint(tmp_path / "gpt2", hf, random_hf_weights(hf))
    assert main(["--init-from", str(base), "--out-dir", str(tmp_path / "out"), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer bytes (257 tokens) does not fit" in err and "--tokenizer gpt2" in err
    assert not (tmp_path / "out" / "ckpt.pt").exists()


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(v) or "gpt2")
def test_what_transformers_save_pretrained_writes_loads_to_its_logits_where_installed(tmp_path,
                                                                                      variant):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(**BASE, **variant, bos_token_id=0, eos_token_id=0)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    theirs.save_pretrained(tmp_path)  # transformers 5: model.safetensors only
    ours = from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, BASE["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("claim,message", [
    (dict(n_embd=32768, n_head=2), "vocab_size and n_embd make wte.weight"),
    (dict(n_layer=100000), "n_layer 100000, but"), (dict(n_positions=4096), "n_positions"),
    (dict(n_inner=99), "n_inner and n_embd make h.0.mlp.c_fc.weight")])
def test_a_config_json_is_held_to_its_weights_before_the_model_is_allocated(
        tmp_path, monkeypatch, claim, message):
    import model as model_module

    built = []
    monkeypatch.setattr(model_module.GPT, "__init__", lambda *a: built.append(a))
    directory = write_checkpoint(tmp_path / "gpt2", {**BASE, **claim}, random_hf_weights(BASE))
    with pytest.raises(ValueError, match=message):
        from_pretrained(str(directory))
    assert not built  # refused before the model was made


def test_nan_weights_and_a_nan_epsilon_are_named(tmp_path):
    sd = random_hf_weights(BASE)
    sd["transformer.h.1.ln_2.bias"][3] = float("nan")
    with pytest.raises(ValueError, match="h.1.ln_2.bias holds values that are not finite"):
        from_pretrained(str(write_checkpoint(tmp_path / "a", BASE, sd)))
    with pytest.raises(ValueError, match="layer_norm_epsilon nan must be a positive number"):
        hf_config({**BASE, "layer_norm_epsilon": float("nan")})
