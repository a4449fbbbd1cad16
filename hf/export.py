"""
Out to Hugging Face's tools: a fine-tuned adapter as PEFT saves a LoRA adapter, and the
merged model as a transformers directory (sample.py --export-peft, --export-hf), for GPT-2
and for the Llama block (LlamaForCausalLM's names: model.layers.N.self_attn.q_proj ...,
nn.Linear's (out, in) layout, so no fan_in_fan_out).

Both write GPT-2's own names, and its linear weights as Conv1D, (in, out). PEFT's LoRA on a
Conv1D keeps lora_A (r, in) and lora_B (out, r), as ours, and adds (B A)^T * alpha / r to
the (in, out) weight (fan_in_fan_out); so the adapter's tensors go out as they are.
"""

import os
import shutil

from safetensors.torch import save_file

from lora import LoRALinear, merge_lora
from plumbing.files import atomic_write, cannot_write, leftovers, remove_leftovers, write_json

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def export_problems(flag, directory):
    """A directory to export into: missing (made) or empty; one that holds files is kept."""
    # a killed export's temporary files are not its files: the export removes them
    kept = set(os.listdir(directory)) - {os.path.basename(p) for p in leftovers(directory)} if (
        os.path.isdir(directory)) else set()
    if kept:
        return [f"{flag} {directory}: the folder holds files already; give a new or empty one"]
    if os.path.exists(directory) and not os.path.isdir(directory):
        return [f"{flag} {directory}: not a folder"]
    reason = cannot_write(directory)  # read-only, a name too long: found before any work
    return [f"{flag} {directory}: cannot write there ({reason})"] if reason else []


def write_safetensors(tensors, path):
    """safetensors' file, written in a folder .tmp<pid> and renamed: the library's own hidden
    temporary file, left by a kill -9, stays in it, and the next write removes it."""
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    folder = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp{os.getpid()}")
    remove_leftovers(os.path.dirname(os.path.abspath(path)))
    os.makedirs(folder, exist_ok=True)
    try:
        save_file(contiguous, os.path.join(folder, os.path.basename(path)))
        os.replace(os.path.join(folder, os.path.basename(path)), path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def export_peft(model, lora_config, directory, base=""):
    """adapter_config.json and adapter_model.safetensors in PEFT's LoRA layout for GPT-2
    (GPT2LMHeadModel's module names, under base_model.model)."""
    os.makedirs(directory, exist_ok=True)
    tensors, targets, llama = {}, set(), model.config.arch == "llama"
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            hf = llama_name(name) if llama else name
            tensors[f"base_model.model.{hf}.lora_A.weight"] = module.lora_A  # (r, in)
            tensors[f"base_model.model.{hf}.lora_B.weight"] = module.lora_B  # (out, r)
            targets.add(name.split(".", 3)[-1])  # transformer.h.0.attn.c_attn: attn.c_attn
    # fan_in_fan_out: GPT-2's Conv1D stores its weights (in, out)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
              "r": lora_config.r, "lora_alpha": lora_config.alpha,
              "lora_dropout": lora_config.dropout, "target_modules": sorted(targets),
              "fan_in_fan_out": not llama, "bias": "none", "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}
    write_safetensors(tensors, os.path.join(directory, "adapter_model.safetensors"))
    write_json(os.path.join(directory, "adapter_config.json"), config)


def llama_name(name):
    """Ours (transformer.h.3.self_attn.q_proj) as LlamaForCausalLM names it."""
    for ours, theirs in (("transformer.wte", "model.embed_tokens"),
                         ("transformer.h.", "model.layers."), ("transformer.ln_f", "model.norm")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def hf_state_dict(model):
    """{name: tensor} of the model as GPT2LMHeadModel (Conv1D weights (in, out)) or
    LlamaForCausalLM names it; the head only where it is not the embedding."""
    out, llama = {}, model.config.arch == "llama"
    for k, v in model.state_dict().items():
        if ".lora_" in k or (k == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        out[llama_name(k) if llama else k] = v if llama or not k.endswith(CONV1D) else v.t()
    return out


def llama_hf_config(c, eot_token):
    """LlamaForCausalLM's config.json of a GPT of arch "llama"."""
    kind, *args = c.rope_scaling or ("default",)
    scaling = None if kind == "default" else dict(rope_type=kind, factor=args[0]) if (
        kind == "linear") else dict(rope_type=kind, factor=args[0], low_freq_factor=args[1],
                                    high_freq_factor=args[2],
                                    original_max_position_embeddings=args[3])
    qwen2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
             "use_sliding_window": False} if c.qkv_bias else {}  # Llama's block, q, k, v biases
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": c.n_inner,
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head or c.n_head, "max_position_embeddings": c.block_size,
            "rms_norm_eps": c.layer_norm_epsilon, "rope_theta": c.rope_theta,
            "rope_scaling": scaling, "attention_bias": c.attention_bias, "hidden_act": "silu",
            "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": eot_token,
            "eos_token_id": eot_token, **qwen2}


# a transformers directory's tokenizer, as AutoTokenizer reads it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def export_hf(model, directory, eot_token, tokenizer_from=""):
    """The model with its adapters merged, as a transformers directory: config.json,
    model.safetensors and the tokenizer files of the directory tokenizer_from (the base's),
    so that AutoTokenizer and AutoModelForCausalLM read it. (The architecture written, the
    tokenizer files copied.)"""
    os.makedirs(directory, exist_ok=True)
    merge_lora(model)
    c = model.config
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
              "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_embd": c.n_embd,
              "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": c.n_inner or None,
              "activation_function": c.activation, "layer_norm_epsilon": c.layer_norm_epsilon,
              "scale_attn_by_inverse_layer_idx": c.scale_attn_by_inverse_layer_idx,
              "tie_word_embeddings": c.tie_word_embeddings, "resid_pdrop": c.dropout,
              "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "bos_token_id": eot_token,
              "eos_token_id": eot_token}
    if c.arch == "llama":
        config = llama_hf_config(c, eot_token)
    write_safetensors(hf_state_dict(model), os.path.join(directory, "model.safetensors"))
    write_json(os.path.join(directory, "config.json"), config)
    copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_from, f))]
    for name in copied if tokenizer_from else []:
        atomic_write(os.path.join(directory, name), lambda tmp: shutil.copyfile(
            os.path.join(tokenizer_from, name), tmp))
    return config["architectures"][0], copied if tokenizer_from else []
