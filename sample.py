"""
Use a fine-tuned adapter: answer prompts, score a file, or take it out to PEFT or transformers.

    python sample.py                          # a few answers of the run's own test split (out/)
    python sample.py --prompt "rsh abc="
    python sample.py --prompt "Once upon" --temperature 0.8 --max-new-tokens 40
    python sample.py --data mine.jsonl        # exact match and loss on prompt/completion pairs
    python sample.py --data boolq/test.json   # read and scored as the run read its own data
    python sample.py --export-peft adapter/   # the adapter as PEFT saves one
    python sample.py --export-hf merged/      # the base with the adapters merged in: a
                                              # transformers directory (--init-from takes it)

A run is found by its --out-dir: ckpt.pt names the base it was trained on (whose hash must
still match) and its settings; adapter.pt holds the adapters it was scored with. The run's
tokenizer, template and answer field are used unless a flag says otherwise; --prompt is
put in the run's template (--raw: as given).
"""

import os
import types
from dataclasses import dataclass

import torch

from data import TokenizerUnavailable, encode, run_tokenizer
from run.splits import load_examples, load_task
from evaluation.scoring import decode, evaluate
from plumbing.report import answer_lines, per_task_lines, score_line
from plumbing.records import DataError, is_records, templated
from hf.export import export_hf, export_peft, export_problems
from lora import LoRAConfig, load_adapter
from plumbing.entry import run_main
from plumbing.files import file_problems, fingerprint, read_checkpoint
from plumbing.devices import autocast_for, check_device, pick_device
from plumbing.settings import flag, not_negative, option, parse_args, positive, refuse
from testbed.pretrain import read_base


@dataclass
class SampleConfig:
    out_dir: str = option("out", "the run to use: its ckpt.pt (base and settings) and adapter.pt")
    prompt: str = option(None, "answer this prompt and stop")
    data: str = option("", "score the adapter on this file (prompt/completion records, .jsonl or "
        ".json, per task where they carry a 'task'; or plain text: loss only)")
    template: str = option(None, "plain or alpaca, for --data's records and --prompt (train.py's "
        "--template; default: the run's)")
    prompt_field: str = option(None, "--data, --template plain: the prompt's field (default: the "
        "run's)")
    completion_field: str = option(None, "--data, --template plain: the completion's (the run's)")
    answer_field: str = option(None, "--data: score answer accuracy on this field (the run's; "
        "\"\": off)")
    raw: bool = option(False, "--prompt as given, without the run's template")
    n: int = option(5, "answers of the run's own test split to show (without --prompt, --data or "
        "an export)")
    temperature: float = option(0.0, "0: greedy (the default); above 0: sampled, from --seed")
    max_new_tokens: int = option(32, "tokens to generate after --prompt (fewer at the context's "
        "end or at <|endoftext|>)")
    seed: int = option(0, "seed of a sampled answer")
    export_peft: str = option("", "write the adapter to this folder as PEFT saves a LoRA adapter "
        "(adapter_config.json, adapter_model.safetensors), for PeftModel.from_pretrained on the "
        "base")
    export_hf: str = option("", "write the base with the adapters merged to this folder as a "
        "transformers GPT-2 (config.json, model.safetensors)")
    device: str = option("auto", "cpu, cuda ...; auto: cuda when available")


RECORD_FLAGS = ("template", "prompt_field", "completion_field", "answer_field")


def problems(config):
    out = not_negative(config, "temperature")
    if 0 < config.temperature < 1e-3:
        out.append(f"--temperature {config.temperature:g}: 0 (greedy) or at least 0.001, where "
                   "sampling still has a distribution")
    out += positive(config, "n", "max_new_tokens")
    out += [check_device(config.device)] if check_device(config.device) else []
    out += file_problems("--data", config.data)
    read = [flag(f) for f in RECORD_FLAGS if getattr(config, f) is not None]
    if config.template is not None and config.prompt is not None:
        read.remove("--template")  # it puts --prompt in the template too
    if read and not (config.data and is_records(config.data)):  # said by refusal, not ignored
        out.append(f"{', '.join(read)} read the records of --data (a .jsonl or .json file)")
    elif config.template == "alpaca" and set(read) & {"--prompt-field", "--completion-field"}:
        out.append("--prompt-field and --completion-field are for --template plain; alpaca "
                   "reads instruction, input and output")
    if config.prompt == "":
        out.append("--prompt is empty: give the text to continue")
    if config.raw and config.prompt is None:
        out.append("--raw passes --prompt as given: give --prompt")
    out += export_problems("--export-peft", config.export_peft) if config.export_peft else []
    out += export_problems("--export-hf", config.export_hf) if config.export_hf else []
    # two outputs never share a place: each export is a folder of its own
    if config.export_peft and config.export_hf and (
            os.path.abspath(config.export_peft) == os.path.abspath(config.export_hf)):
        out.append(f"--export-peft and --export-hf name one folder "
                   f"({os.path.abspath(config.export_hf)}): give each output its own")
    return out


def load_run(out_dir, device):
    """(model with the run's adapters, the run's settings as a namespace)."""
    ckpt_path, adapter_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "adapter.pt")
    if not os.path.exists(ckpt_path):
        refuse([f"--out-dir {out_dir}: no ckpt.pt there; run python train.py --out-dir {out_dir} "
                "first"])
    ckpt = read_checkpoint(ckpt_path, "--out-dir",
                           ("config", "base", "base_hash", "adapter", "lora_config"))
    base = ckpt["base"]
    if not os.path.exists(base):
        refuse([f"the base model {base} that {ckpt_path} was trained on is gone"])
    if fingerprint(base) != ckpt["base_hash"]:
        refuse([f"the base model {base} has changed since {ckpt_path} was trained on it "
                f"(hash {fingerprint(base)}, the checkpoint's {ckpt['base_hash']})"])
    model = read_base(base)
    if not os.path.exists(adapter_path):  # the run stopped early: its last checkpoint's adapters
        adapter_path = ckpt_path
    # a broken file: one line, not a traceback
    read_checkpoint(adapter_path, "--out-dir", ("lora_config", "adapter"))
    try:
        load_adapter(model, adapter_path)
    except (ValueError, KeyError, TypeError) as e:  # TypeError: LoRA settings we do not know
        refuse([f"{adapter_path}: does not fit the base model {base} ({e})"])
    config = dict(ckpt["config"])  # a run of before the renames: its flags by their new names
    for old, new in (("val_data", "test_data"), ("n_val", "n_test"), ("n_val", "dev_size")):
        config.setdefault(new, config.get(old))
    settings = types.SimpleNamespace(**config)
    settings.quiet, settings.base = True, base
    return model.to(device).eval(), settings


def sample(config):
    refuse(problems(config))
    device = pick_device(config.device)
    model, run = load_run(config.out_dir, device)
    # the exports tokenize nothing: without the run's tokenizer file they are still written
    exports = bool(config.export_peft or config.export_hf)
    exports_only = exports and not (config.prompt or config.data)
    try:
        # the base the run trained on (a resumed run may not name it): its own tokenizer
        tokenizer = run_tokenizer(types.SimpleNamespace(**{**vars(run), "init_from": run.base}))
    except TokenizerUnavailable as e:
        if not exports_only:
            raise
        tokenizer = None
        print(f"note: {e}; the exports are written without it (--export-hf's config.json "
              "then names no end-of-text token)")
    in_template = not config.raw and (config.template is not None or is_records(run.data or ""))
    for name in RECORD_FLAGS:  # the run's, where not given
        if getattr(config, name) is None:
            setattr(config, name, getattr(run, name))
    torch.manual_seed(config.seed)
    if config.export_peft:  # PEFT loads it onto the base as transformers holds it
        lora = LoRAConfig(run.lora_r, run.lora_alpha, run.lora_dropout)
        export_peft(model, lora, config.export_peft, run.init_from or "")
        print(f"wrote {config.export_peft}: the adapter in PEFT's LoRA layout")
    if config.export_hf:
        base_dir = run.base if os.path.isdir(run.base) else ""
        arch, copied = export_hf(model, config.export_hf, tokenizer.eot_token if tokenizer
                                 else None, base_dir)
        print(f"wrote {config.export_hf}: the merged model as a transformers {arch} directory, "
              + (f"with the base's tokenizer ({', '.join(copied)})" if copied else "with no "
                 "tokenizer file (the run's tokenizer is not a transformers one)"))
    # every output asked for is written above; then the prompt, the file, or the run's answers
    if config.prompt:
        text = templated(config.template, config.prompt) if in_template else config.prompt
        prompt, context = encode(tokenizer, text), model.config.block_size
        if len(prompt) >= context:  # cut, and said: the answer needs a position
            print(f"note: the model's context is {context} tokens: of the prompt's {len(prompt)}, "
                  f"the last {context - 1} are kept, and the answer has room for one")
            prompt = prompt[-(context - 1) :]
        with autocast_for(device):
            out = model.generate([prompt], config.max_new_tokens, config.temperature,
                                 stop_token=tokenizer.eot_token)[0]
        answer = decode(tokenizer, out)
        if not run.data:  # the default task's answers end at their newline (no <|endoftext|>)
            answer = answer[: answer.index("\n") + 1] if "\n" in answer else answer
        print(f"{config.prompt!r} -> {answer!r}")
    elif config.data or not exports:
        if config.data:
            examples = load_examples(config, config.data, tokenizer, model.config.block_size)
            where, is_qa = config.data, is_records(config.data)
        else:
            task, is_qa = load_task(run, tokenizer, model.config.block_size)
            examples, where = task.test[: config.n], f"the test split of {config.out_dir}'s task"
        result = evaluate(model, examples, tokenizer, device, is_qa, n_answers=config.n,
                          max_new_tokens=config.max_new_tokens)
        print("\n".join(answer_lines(result["answers"]) + [
            f"{where}: {len(examples)} samples, {score_line(result)}"] + per_task_lines(
            result["per_task"])))
        return result


def main(argv=None):
    return run_main(lambda: sample(parse_args(
        SampleConfig, argv, description=__doc__.strip())), (DataError, TokenizerUnavailable))


if __name__ == "__main__":
    raise SystemExit(main())
