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
# Llama 3's pre-tokenizer pattern (its tokenizer.json's Split), for a tokenizer of that kind
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                  r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


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


TEXTS = ["Hello world", "héllo wörld — naïve café", "日本語のテキスト",
         "emoji 🙂🚀 and tabs\tnew\nlines", "   spaces   ", "numbers 12345 67890",
         "mixed: Ünïcödé ∑∫√ and 'quotes' it's", "a" * 50]


def byte_level_tokenizer_dir(tmp_path, pattern=None):
    """A byte-level BPE trained here with the tokenizers library, saved as a model directory
    saves it (tokenizer.json, tokenizer_config.json), with its vocab.json and merges.txt."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, models, pre_tokenizers, trainers, decoders

    tok = tokenizers.Tokenizer(models.BPE())
    if pattern:  # a Split by pattern, then ByteLevel without its own regex (Llama 3, SmolLM2)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # GPT-2's
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 50,
                            trainer)
    directory = tmp_path / "tok"
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return directory, tok


@pytest.mark.parametrize("pattern", [None, "llama3"])
def test_a_byte_level_tokenizer_json_encodes_and_decodes_as_transformers_tokenizer(tmp_path,
                                                                                 pattern):
    """Our Encoding of a directory's tokenizer.json against transformers' own tokenizer of
    the same directory (the tokenizers library's, where transformers is absent)."""
    from hf.tokenizer import from_directory

    directory, reference = byte_level_tokenizer_dir(
        tmp_path, LLAMA3_PATTERN if pattern else None)
    encode, decode = (lambda t: reference.encode(t).ids), reference.decode
    try:
        import transformers

        theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(
            directory / "tokenizer.json"))
        encode = lambda t: theirs(t, add_special_tokens=False)["input_ids"]
        decode = theirs.decode
    except ImportError:
        pass
    ours = from_directory(str(directory))
    for text in TEXTS:
        ids = encode(text)
        assert ours.encode(text, disallowed_special=()) == ids, text
        assert ours.decode(ids) == decode(ids) == text
    assert ours.eot_token == reference.token_to_id("<|endoftext|>")


def merges_of(ranks):
    """vocab.json's and merges.txt's text of byte-level BPE ranks ({token bytes: rank}, ranks
    in merge order, as tiktoken's gpt2 holds them): each token's merge is the last step of
    BPE on its bytes with the tokens ranked below it."""
    from hf.tokenizer import byte_decoder

    to_char = {b: c for c, b in byte_decoder().items()}
    text = lambda bs: "".join(to_char[b] for b in bs)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, 1 << 62), i)
                     for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            assert best < rank, token
            parts[i: i + 2] = [parts[i] + parts[i + 1]]
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    vocab = {text(token): rank for token, rank in ranks.items()}
    return json.dumps(vocab), "#version: 0.2\n" + "\n".join(merges) + "\n"


def test_gpt2_s_vocab_and_merges_equal_tiktoken_s_gpt2_where_cached(tmp_path):
    """GPT-2's two files (written here from the ranks they encode) read as vocab.json +
    merges.txt encode as the library does; and as tiktoken's own gpt2 where its file is
    cached (tiktoken builds gpt2 from exactly these two files)."""
    from hf.tokenizer import from_directory

    directory, reference = byte_level_tokenizer_dir(tmp_path)
    ours_json = from_directory(str(directory))
    (directory / "tokenizer.json").unlink()
    vocab, merges = merges_of({k: v for k, v in ours_json._mergeable_ranks.items()})
    (directory / "vocab.json").write_text(json.dumps({**json.loads(vocab), "<|endoftext|>": 0}))
    (directory / "merges.txt").write_text(merges)
    ours = from_directory(str(directory))
    for text in TEXTS:
        assert ours.encode(text, disallowed_special=()) == reference.encode(text).ids, text
    try:
        import tiktoken

        gpt2 = tiktoken.get_encoding("gpt2")
    except Exception:
        return  # tiktoken's gpt2 file is not cached here: the comparison above stands
    vocab, merges = merges_of(gpt2._mergeable_ranks)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "vocab.json").write_text(json.dumps(
        {**json.loads(vocab), "<|endoftext|>": gpt2.eot_token}))
    (tmp_path / "gpt2" / "merges.txt").write_text(merges)
    from_files = from_directory(str(tmp_path / "gpt2"))
    for text in TEXTS:
        assert from_files.encode(text, disallowed_special=()) == gpt2.encode(text), text


def test_a_sentencepiece_tokenizer_is_refused_by_name(tmp_path):
    from hf.tokenizer import from_directory

    (tmp_path / "tokenizer.model").write_bytes(b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    with pytest.raises(ValueError, match="SentencePiece"):
        from_directory(str(tmp_path))


def llama_with_its_tokenizer(tmp_path, transformers):
    """A tiny Llama written by transformers beside its own byte-level tokenizer, and a small
    prompt/completion file (tmp_path / d.jsonl): (directory, tokenizer, config)."""
    directory, tokenizer = byte_level_tokenizer_dir(tmp_path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY, "vocab_size": tokenizer.get_vocab_size(),
                                         "max_position_embeddings": 32})
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    rows = [{"prompt": f"echo {w}=", "completion": f"{w}\n"} for w in ("abc", "xyz", "moo", "eel")]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows * 6))
    return directory, tokenizer, config


def test_a_llama_directory_with_its_tokenizer_goes_through_train_sample_and_exports(tmp_path,
                                                                                  capsys):
    """A Llama written by transformers beside its own byte-level tokenizer.json trains with
    no tokenizer flag and the paper's LoRA targets, answers in sample.py and exports; the
    GPT-2 default targets are refused by name before any step."""
    transformers = pytest.importorskip("transformers")
    import sample
    from train import main

    directory, tokenizer, config = llama_with_its_tokenizer(tmp_path, transformers)
    flags = ["--init-from", str(directory), "--data", str(tmp_path / "d.jsonl"), "--steps", "3",
             "--batch-size", "4", "--eval-interval", "3", "--quiet", "--no-picture",
             "--out-dir", str(tmp_path / "run")]
    assert main([*flags, "--lora-targets", "c_attn"]) == 2  # GPT-2's names on a Llama
    assert "matches no Linear module of this llama base" in capsys.readouterr().err
    assert main(flags) == 0  # the paper's targets, by architecture
    assert sample.main(["--out-dir", str(tmp_path / "run"), "--prompt", "echo abc=",
                        "--export-peft", str(tmp_path / "peft"), "--export-hf",
                        str(tmp_path / "merged")]) == 0
    # the byte tokenizer (257 tokens) would not fit this vocabulary: the directory's was used
    out = capsys.readouterr().out
    assert "'echo abc=' -> '" in out and config.vocab_size != 257
    # the export carries the base's tokenizer: transformers reads both from it
    assert "transformers LlamaForCausalLM directory, with the base's tokenizer" in out
    merged_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged_tokenizer("echo abc=")["input_ids"] == tokenizer.encode("echo abc=").ids
    # the exports answer in transformers and PEFT as sample.py's model does
    peft = pytest.importorskip("peft")
    from sample import load_run

    ours, _ = load_run(str(tmp_path / "run"), "cpu")
    idx = torch.tensor([tokenizer.encode("echo abc=").ids])
    with torch.no_grad():
        expected = ours(idx)[0]
        merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(idx).logits, expected, atol=1e-5, rtol=1e-5)
        base = transformers.LlamaForCausalLM.from_pretrained(directory)
        tuned = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
        torch.testing.assert_close(tuned(idx).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_bf16_base_keeps_float32_adapters_and_per_sample_gradients(tiny, capsys):
    """--base-dtype bfloat16: the frozen base in bf16, the adapters and their per-sample
    gradients in float32 (whose mean is the batch gradient), and a run that trains."""
    from gast import per_sample_grads_and_losses
    from train import train

    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                          block_size=16, vocab_size=40, n_inner=48, bias=False))
    model.to(torch.bfloat16)
    add_lora(model, LoRAConfig(r=4, alpha=8, targets=PAPER_TARGETS), verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    x, y = torch.randint(0, 40, (4, 10)), torch.randint(0, 40, (4, 10))
    grads, _ = per_sample_grads_and_losses(model, x, y)
    model(x, y)[1].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert grads[name].dtype == torch.float32
            torch.testing.assert_close(grads[name].mean(0), p.grad, atol=1e-3, rtol=1e-2)
    metrics = train(tiny(base_dtype="bfloat16", steps=4, eval_interval=4), summary=False)
    loss = metrics["held_out_loss"]
    assert loss == loss and metrics["steps"] == 4  # finite, and it ends


def test_a_llama_run_resumes_without_init_from_on_its_base_s_own_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from train import main

    directory, tokenizer, config = llama_with_its_tokenizer(tmp_path, transformers)
    common = ["--data", str(tmp_path / "d.jsonl"), "--steps", "4", "--batch-size", "4",
              "--eval-interval", "2", "--quiet", "--no-picture", "--out-dir", str(tmp_path / "run"),
              "--lora-targets", ",".join(PAPER_TARGETS)]
    assert main(["--init-from", str(directory), *common, "--stop-at", "2"]) == 0
    assert main([*common, "--resume"]) == 0  # --init-from left out: the checkpoint's base
    import sample

    assert sample.main(["--out-dir", str(tmp_path / "run"), "--prompt", "echo abc="]) == 0
