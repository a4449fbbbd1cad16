"""
The models people bring, at their published shapes: SmolLM2-135M and -360M, Llama-3.2-1B and
Qwen2.5-0.5B, their config.json fields as published (positions, heads, key-value heads, rope
settings, tying, the extra fields their files carry), with two blocks, a small vocabulary
and, for Llama-3.2-1B, a smaller width (its heads and their ratio kept), random weights
written by transformers. Our logits are held to transformers', the config fields it reads
differently are refused by name, and docs/paper.md's flags run on a SmolLM2-135M shape.
"""

import json
import re

import pytest
import torch

from hf.load import from_pretrained

transformers = pytest.importorskip("transformers")

SMOLLM2 = dict(model_type="llama", hidden_act="silu", attention_bias=False, rms_norm_eps=1e-5,
               max_position_embeddings=8192, rope_theta=100000.0, rope_scaling=None,
               tie_word_embeddings=True, is_llama_config=True, rope_interleaved=False,
               pretraining_tp=1, bos_token_id=0, eos_token_id=0)
PUBLISHED = {
    "SmolLM2-135M": dict(SMOLLM2, hidden_size=576, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3),
    "SmolLM2-360M": dict(SMOLLM2, hidden_size=960, intermediate_size=2560,
                         num_attention_heads=15, num_key_value_heads=5),
    # width 2048 and 32 heads of 64 in the file; here 4 heads of 64 and 1 key-value head
    "Llama-3.2-1B": dict(model_type="llama", hidden_size=256, intermediate_size=1024,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, mlp_bias=False,
                         rope_theta=500000.0, tie_word_embeddings=True, rope_scaling=dict(
                             factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                             original_max_position_embeddings=8192, rope_type="llama3"),
                         bos_token_id=1, eos_token_id=2),
    "Qwen2.5-0.5B": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864,
                         num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, max_window_layers=24,
                         rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768,
                         use_sliding_window=False, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=1),
}


def written(directory, fields, vocab_size=512, seed=0, edit=None):
    """A model of these config.json fields, two blocks, random weights, as transformers'
    save_pretrained writes it; edit(config dict) changes its config.json afterwards."""
    fields = dict(fields)
    kind = fields.pop("model_type")
    config = transformers.AutoConfig.for_model(kind, **fields, num_hidden_layers=2,
                                               vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # biases and norms off their zeros and ones, so each one counts
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "layernorm.weight")):
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    model.save_pretrained(directory)
    if edit:
        path = directory / "config.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return directory


def same_logits(directory, T=40):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    ours = from_pretrained(str(directory)).eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, T),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, atol=1e-5, rtol=1e-5)
    return ours


@pytest.mark.parametrize("name", PUBLISHED)
def test_the_published_shapes_give_transformers_logits(name, tmp_path):
    ours = same_logits(written(tmp_path / name, PUBLISHED[name]))
    fields = PUBLISHED[name]
    assert ours.config.block_size == fields["max_position_embeddings"]
    assert ours.config.n_kv_head == fields["num_key_value_heads"]
    assert ours.config.qkv_bias == (fields["model_type"] == "qwen2")


def test_rope_scaling_beside_rope_parameters_is_read_as_transformers_reads_it(tmp_path):
    def both(config):  # transformers 5 writes rope_parameters; an older file, rope_scaling
        config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
        return config

    ours = same_logits(written(tmp_path / "both", PUBLISHED["SmolLM2-135M"], edit=both))
    assert ours.config.rope_scaling == ("linear", 2.0)


def test_a_tied_config_whose_file_holds_its_own_head_keeps_it_as_transformers_does(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = written(tmp_path / "tied", PUBLISHED["SmolLM2-135M"])
    weights = load_file(str(directory / "model.safetensors"))
    weights["lm_head.weight"] = torch.randn_like(weights["model.embed_tokens.weight"])
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    assert not same_logits(directory).config.tie_word_embeddings


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "linear"}, "rope_scaling (linear) has no factor"),
    ({"rope_type": "linear", "factor": 0}, "rope_scaling's factor 0 must be a positive number"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0},
     "rope_scaling (llama3) has no high_freq_factor"),
    ({"rope_type": "linear", "factor": 2.0, "beta": 1}, "rope_scaling's field 'beta' is not one"),
    ({"rope_type": "yarn", "factor": 2.0}, "rope_scaling of type 'yarn' is not supported"),
    ({"rope_type": "default", "rope_theta": -10000.0},
     "rope_scaling's rope_theta -10000.0 must be a positive number")])
def test_a_malformed_rope_field_is_refused_by_name(rope, message, tmp_path):
    from testbed.pretrain import read_base
    from plumbing.settings import ConfigError

    def edit(config):
        config["rope_scaling"] = rope
        return config

    directory = written(tmp_path / "m", PUBLISHED["SmolLM2-135M"], vocab_size=64, edit=edit)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_base(str(directory))


def test_a_sliding_window_in_use_is_refused(tmp_path):
    from testbed.pretrain import read_base
    from plumbing.settings import ConfigError

    directory = written(tmp_path / "q", {**PUBLISHED["Qwen2.5-0.5B"], "hidden_size": 56,
                                         "intermediate_size": 64, "num_attention_heads": 14},
                        vocab_size=64, edit=lambda c: {**c, "use_sliding_window": True,
                                                       "sliding_window": 32768})
    with pytest.raises(ConfigError, match="sliding_window 32768 is not supported"):
        read_base(str(directory))


def paper_flags():
    """docs/paper.md's PAPER flags, as written there, with $BASE and $TESTS left to fill."""
    import os
    import re
    import shlex

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "paper.md")).read()
    return shlex.split(re.search(r'PAPER="(.*?)"', doc, re.S).group(1).replace("\\\n", " "))


def test_the_papers_flags_run_on_a_smollm2_135m_shaped_model_with_its_own_tokenizer(
        tmp_path, capsys):
    """docs/paper.md's flags, as written, on SmolLM2-135M's config (8,192 positions, 9 heads,
    3 key-value heads, its vocabulary of 49,152, tied; two blocks) with a tokenizer.json of
    its own: the paper's LoRA targets by architecture, the cutoff at 256, two steps."""
    from test_llama import byte_level_tokenizer_dir
    from test_paper_setting import commonsense, write_json
    from train import main

    directory, _ = byte_level_tokenizer_dir(tmp_path)
    written(directory, PUBLISHED["SmolLM2-135M"], vocab_size=49152)
    data = write_json(tmp_path / "commonsense_170k.json", [
        commonsense(task, i) for i in range(300) for task in ("boolq", "piqa")])  # 112 steps
    tests = ",".join(write_json(tmp_path / task / "test.json", [  # records of their own
        commonsense(task, i) for i in range(1000, 1003)]) for task in ("boolq", "piqa"))
    flags = [f.replace("$BASE", str(directory)).replace("$TESTS", tests).replace(
        "commonsense_170k.json", data) for f in paper_flags()]
    assert "--cutoff-len" in flags and flags[flags.index("--cutoff-len") + 1] == "256"
    argv = [*flags, "--method", "gast", "--stop-at", "2", "--max-new-tokens", "4",
            "--out-dir", str(tmp_path / "out"), "--no-picture", "--dev-size", "4"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "LoRA on q_proj, k_proj, v_proj, up_proj, down_proj (llama's default" in out
    assert "per-sample gradients by vmap" in out or "per-sample gradients by blocks" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["tokenizer"] == f"{directory}'s own" and metrics["steps"] == 2
    assert set(metrics["per_task"]) == {"boolq", "piqa"}
    # the shortest command needs no other flag (the ones after it only keep the test short),
    # here on the same shape with a vocabulary of 512
    import shutil

    small = written(tmp_path / "small", PUBLISHED["SmolLM2-135M"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(directory / name, small / name)
    shortest = ["--init-from", str(small), "--data", data, "--template", "alpaca",
                "--answer-field", "answer", "--test-data", tests]
    assert main([*shortest, "--stop-at", "1", "--dev-size", "4", "--max-new-tokens", "4",
                 "--out-dir", str(tmp_path / "short")]) == 0


def test_a_qwen2_export_is_a_qwen2_directory_transformers_reads_to_our_logits(tmp_path):
    from hf.export import export_hf

    ours = from_pretrained(str(written(tmp_path / "q", PUBLISHED["Qwen2.5-0.5B"]))).eval()
    idx = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ours(idx)[0]
        assert export_hf(ours, str(tmp_path / "out"), 1)[0] == "Qwen2ForCausalLM"
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(theirs(idx).logits, expected, atol=1e-5, rtol=1e-5)


def test_an_eos_token_outside_the_vocabulary_is_refused_by_name(tmp_path):
    from test_llama import byte_level_tokenizer_dir
    from hf.tokenizer import from_directory

    directory, _ = byte_level_tokenizer_dir(tmp_path)
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(ValueError, match=re.escape("eos_token '<|im_end|>' is not one of the")):
        from_directory(str(directory))
