"""
Hugging Face checkpoints in: a GPT-2 or Llama-family directory as transformers'
save_pretrained writes it (config.json and model.safetensors, its sharded index, or
pytorch_model.bin), read into model.GPT with every shape checked and every config.json
field honoured, ignored for a stated reason, or refused by name. bf16 and fp16 weights are
read and converted to float32. Nothing is downloaded. The way out is hf/export.py.
"""

import json
import math
import os
from dataclasses import replace

import torch

from hf.tokenizer import read_json
from model import ACTIVATIONS, GPT, GPTConfig


def from_pretrained(path, dropout=0.0):
    """Load a GPT-2 checkpoint stored locally in the Hugging Face layout.

    path: a directory with model.safetensors (what transformers' save_pretrained writes
    today), its sharded index, or pytorch_model.bin, and config.json; or the weights
    file itself. Nothing is downloaded. Every config.json field is honoured or refused
    (hf_config). Hugging Face's GPT-2 stores its linear weights as Conv1D, (in, out),
    so they are transposed into nn.Linear's (out, in).
    """
    sd_hf, weights = read_hf_weights(path)
    config_file = os.path.join(os.path.dirname(weights), "config.json")
    if not os.path.exists(config_file):  # the shape is read, never guessed from the weights
        raise FileNotFoundError(f"{config_file}: missing (the model's shape is read from it)")
    hf = read_json(config_file)
    if hf.get("model_type") in LLAMAS:
        return llama_from_pretrained(sd_hf, weights, hf, dropout)
    # GPT2LMHeadModel prefixes its keys with "transformer."; GPT2Model does not
    sd_hf = {k.removeprefix("transformer."): v for k, v in sd_hf.items()}
    # the causal-mask buffers carry no weights
    sd_hf = {k: v for k, v in sd_hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    config = tied_as_transformers_ties(hf_config(hf, dropout), sd_hf)
    check_against_weights(config, sd_hf, weights)  # before the model is allocated
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd_hf = {k: v.t() if k.endswith(conv1d) else v for k, v in sd_hf.items()}  # (in, out) -> ours
    return built_from(config, sd_hf, weights, "GPT-2's")


def tied_as_transformers_ties(config, sd):
    """A tied config's head: the embedding, dropping a copy the file keeps; but a head of
    other values than the embedding's stays its own, untied, as transformers loads it."""
    head, embedding = sd.get("lm_head.weight"), sd.get("wte.weight")
    if config.tie_word_embeddings and head is not None and embedding is not None and not (
            torch.equal(head, embedding)):
        print("note: config.json ties the head to the embedding, but the weights hold a head of "
              "its own: it is kept untied, as transformers does")
        return replace(config, tie_word_embeddings=False)
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return config


def built_from(config, sd, weights, layout):
    """The GPT of config with the weights sd ({name under transformer.: tensor}, the head as
    lm_head.weight), every name and shape held to the model's; bf16 and fp16 become float32."""
    model = GPT(config)
    ours = model.state_dict()
    name = lambda k: k if k == "lm_head.weight" else "transformer." + k
    expected = {k for k in ours if k != "lm_head.weight" or not config.tie_word_embeddings}
    mismatched = sorted(set(map(name, sd)) ^ expected)  # missing or extra
    if mismatched:
        raise ValueError(f"{weights}: keys do not match {layout} layout: {mismatched[:8]}")
    with torch.no_grad():
        for k, v in sd.items():
            if v.shape != ours[name(k)].shape:
                raise ValueError(f"{weights}: {k} has shape {tuple(v.shape)}, expected "
                                 f"{tuple(ours[name(k)].shape)}")
            ours[name(k)].copy_(v)
    return model


LLAMAS = ("llama", "mistral", "qwen2")  # the Llama block's config.json model types


def llama_from_pretrained(sd_hf, weights, hf, dropout=0.0):
    """A Llama-family checkpoint (Llama, SmolLM2, Qwen2; Mistral without a sliding window) as
    a GPT of arch "llama"; its weights keep Llama's names under transformer.h."""
    config = llama_config(hf, dropout)
    rename = {"model.embed_tokens.": "wte.", "model.layers.": "h.", "model.norm.": "ln_f."}
    sd = {}
    for k, v in sd_hf.items():
        if k.endswith("rotary_emb.inv_freq"):  # older files keep it; it is computed here
            continue
        for old, new in rename.items():
            k = new + k[len(old):] if k.startswith(old) else k
        sd[k] = v
    config = tied_as_transformers_ties(config, sd)
    check_against_weights(config, sd, weights)  # before the model is allocated
    return built_from(config, sd, weights, "the Llama")


def llama_config(hf, dropout=0.0):
    """The GPTConfig of a Llama-family config.json: each field honoured, ignored for a
    reason, or refused by name."""
    qwen2 = hf.get("model_type") == "qwen2"  # Llama's block with biases on q, k and v
    if hf.get("sliding_window") is not None and (not qwen2 or hf.get("use_sliding_window")):
        raise ValueError(f"config.json: sliding_window {hf['sliding_window']} is not supported "
                         "(our attention sees the whole context; Qwen2's use_sliding_window "
                         "false leaves it unused)")
    if any(kind != "full_attention" for kind in hf.get("layer_types") or []):
        raise ValueError("config.json: layer_types other than full_attention are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not silu")
    if hf.get("mlp_bias") or hf.get("rope_interleaved"):  # SmolLM2's files say false
        raise ValueError(f"config.json: {'mlp_bias' if hf.get('mlp_bias') else 'rope_interleaved'}"
                         " true is not supported")
    theta, rope = rope_of(hf)
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise ValueError(f"config.json: head_dim {head_dim} is not hidden_size / heads")
    honoured = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "rms_norm_eps",
                "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias", "hidden_act",
                "mlp_bias", "head_dim", "sliding_window", "rope_parameters", "use_sliding_window",
                "rope_interleaved"}
    # attention_dropout: fine-tuning runs the base without dropout; pretraining_tp: how Meta
    # split its matmuls to pretrain, the same function; the window fields: only with a window,
    # which is refused above; layer_types: every layer full attention here; is_llama_config:
    # a mark SmolLM2's conversion left
    ignored = HF_IGNORED | {"attention_dropout", "pretraining_tp", "max_window_layers",
                            "use_sliding_window", "layer_types", "is_llama_config"}
    unknown = sorted(set(hf) - honoured - ignored)
    if unknown:
        raise ValueError(f"config.json: field {unknown[0]!r} is not one we know how to honour")
    eps = hf.get("rms_norm_eps", 1e-6)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"config.json: rms_norm_eps {eps!r} must be a positive number")
    return GPTConfig(arch="llama", n_layer=hf["num_hidden_layers"],
                     n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                     n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                     block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                     n_inner=hf["intermediate_size"], layer_norm_epsilon=eps, dropout=dropout,
                     bias=False, rope_theta=float(theta), qkv_bias=qwen2,
                     rope_scaling=rope, attention_bias=bool(hf.get("attention_bias", False)),
                     tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))


# the fields each kind of rope scaling reads, as transformers' rope functions read them
ROPE_FIELDS = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                          "original_max_position_embeddings")}


def rope_of(hf):
    """(rope_theta, GPTConfig.rope_scaling) as transformers 5.25 reads config.json: its
    rope_scaling before rope_parameters (transformers 5's own), the theta in that dict, else
    rope_theta, else 10000; llama3's original context defaults to the model's. Every field
    missing, unknown or not a positive number is refused by name."""
    scaling = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    theta = scaling.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind not in ROPE_FIELDS:
        raise ValueError(f"config.json: {where} of type {kind!r} is not supported (we have "
                         f"{', '.join(ROPE_FIELDS)})")
    if kind == "llama3":
        scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    values = [theta] + [scaling.get(f) for f in ROPE_FIELDS[kind]]
    for name, value in zip(("rope_theta", *ROPE_FIELDS[kind]), values):
        if value is None:
            raise ValueError(f"config.json: {where} ({kind}) has no {name}")
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"config.json: {where}'s {name} {value!r} must be a positive number")
    unknown = sorted(set(scaling) - set(ROPE_FIELDS[kind]))
    if unknown:
        raise ValueError(f"config.json: {where}'s field {unknown[0]!r} is not one a {kind} rope "
                         "reads")
    if kind == "llama3" and values[3] <= values[2]:
        raise ValueError(f"config.json: {where}'s high_freq_factor must be above low_freq_factor")
    return float(theta), () if kind == "default" else (kind, *values[1:])


def check_against_weights(config, sd_hf, weights):
    """The shape config.json claims, held to the weights' own before anything is allocated
    (a claimed n_embd of 32768 over small weights would fill memory first); and every
    weight finite."""
    blocks = {int(k.split(".")[1]) for k in sd_hf if k.startswith("h.")}
    inner = config.n_inner or 4 * config.n_embd
    kv = (config.n_kv_head or config.n_head) * (config.n_embd // config.n_head)
    claims = [("vocab_size", "wte.weight", (config.vocab_size, config.n_embd)),
              ("n_positions", "wpe.weight", (config.block_size, config.n_embd)),
              ("n_inner", "h.0.mlp.c_fc.weight", (config.n_embd, inner)),  # Conv1D
              ("intermediate_size", "h.0.mlp.up_proj.weight", (inner, config.n_embd)),
              ("num_key_value_heads", "h.0.self_attn.k_proj.weight", (kv, config.n_embd))]
    for field, key, shape in claims:
        if key in sd_hf and tuple(sd_hf[key].shape) != shape:
            raise ValueError(f"config.json: {field} and n_embd make {key} {shape}, but {weights} "
                             f"holds {tuple(sd_hf[key].shape)}")
    if blocks and len(blocks) != config.n_layer:
        raise ValueError(f"config.json: n_layer {config.n_layer}, but {weights} holds "
                         f"{len(blocks)} blocks")
    for k, v in sd_hf.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{weights}: {k} holds values that are not finite (nan or inf)")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def read_hf_weights(path):
    """({name: tensor}, the file read) of a Hugging Face checkpoint: model.safetensors (by
    the safetensors library), its sharded index, or pytorch_model.bin (weights_only)."""
    if os.path.isdir(path):
        found = [f for f in WEIGHT_FILES if os.path.exists(os.path.join(path, f))]
        if not found:
            raise FileNotFoundError(
                f"{path}: no GPT-2 checkpoint there (neither model.safetensors nor "
                "pytorch_model.bin)")
        path = os.path.join(path, found[0])
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no GPT-2 checkpoint there")
    if path.endswith(".index.json"):  # sharded: the index names each tensor's file
        from safetensors.torch import load_file

        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        weights = {}
        for shard in shards:
            weights.update(load_file(os.path.join(os.path.dirname(path), shard)))
        return weights, path
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path), path
    return torch.load(path, map_location="cpu", weights_only=True), path


# config.json fields that change nothing we compute, or that fine-tuning sets itself:
# GPT-2's dropouts (fine-tuning runs the base without dropout; LoRA has its own,
# --lora-dropout), generation and tokenizer settings, and bookkeeping
HF_IGNORED = {"resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj",
              "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
              "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "architectures",
              "model_type", "transformers_version", "task_specific_params", "torch_dtype", "dtype",
              "use_cache", "n_ctx", "_name_or_path", "output_past", "id2label", "label2id",
              "problem_type", "return_dict", "tokenizer_class", "prefix", "use_return_dict",
              "output_attentions", "output_hidden_states", "chunk_size_feed_forward",
              "is_encoder_decoder"}


def hf_config(hf, dropout=0.0):
    """The GPTConfig of a GPT-2 config.json: each field honoured, ignored for a reason
    (HF_IGNORED), or refused with a ValueError naming it."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json: model_type {hf['model_type']!r} is not one we build "
                         f"(gpt2, {', '.join(LLAMAS)})")
    # reorder_and_upcast_attn: ours computes attention in the model's dtype
    refused = {"reorder_and_upcast_attn": False, "add_cross_attention": False,
               "scale_attn_weights": True}
    for field, supported in refused.items():
        if hf.get(field, supported) != supported:
            raise ValueError(f"config.json: {field} {hf[field]!r} is not supported")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"config.json: activation_function {activation!r} is not supported (we have "
            f"{', '.join(ACTIVATIONS)})")
    honoured = {"n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "tie_word_embeddings",
                "scale_attn_by_inverse_layer_idx", "layer_norm_epsilon", "activation_function",
                "n_inner"}
    unknown = sorted(set(hf) - honoured - HF_IGNORED - set(refused))
    if unknown:
        raise ValueError(f"config.json: field {unknown[0]!r} is not one we know how to honour")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"config.json: layer_norm_epsilon {eps!r} must be a positive number")
    return GPTConfig(
        n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
        block_size=hf["n_positions"], vocab_size=hf["vocab_size"], dropout=dropout, bias=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), activation=activation,
        n_inner=hf.get("n_inner") or 0)
