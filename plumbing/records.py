"""
Reading a run's data files, with refusals before any work: plain text (UTF-8), and
prompt/completion records (.jsonl, one object a line; .json, a JSON array of objects as
LLM-Adapters' files are), each field checked. A DataError names the file and the line
or element at fault.
"""

import json
from dataclasses import dataclass, field

from data import Example, encode, n_targets


class DataError(ValueError):
    """Bad input data; the message starts with the file (and line) at fault."""


def read_text_file(path):
    """The file's text; DataError for a missing, empty or non-UTF-8 file (with its line).

    A UTF-8 byte-order mark at the start (Windows editors write one) is dropped."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(
            f"{path}: UTF-16 (its byte-order mark says so), not UTF-8; save it as UTF-8")
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})"
        ) from None


# characters in one JSONL line: far beyond any context, and it keeps a bad file from
# filling memory
MAX_LINE = 1 << 20

# The Stanford Alpaca prompt, as LLM-Adapters fine-tunes and evaluates with it (its own
# strings carry indentation that differs between the two; one clean template for both is
# our choice). The completion is the record's "output".
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
TEMPLATES = ("plain", "alpaca")


def is_records(path):
    """Prompt/completion records (.jsonl, or .json: LLM-Adapters' arrays), not plain text."""
    return path.lower().endswith((".jsonl", ".json"))


class RepeatedKey(ValueError):
    pass


def unique_keys(pairs):
    """A JSON object's dict, refusing a key given twice (json keeps the last without a word)."""
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise RepeatedKey(f"the key {twice[0]!r} is given twice in one object")
    return dict(pairs)


DECODER = json.JSONDecoder(object_pairs_hook=unique_keys)


def decoded(text, where):
    """The JSON value of text, by the json library; a DataError at where (a function of the
    decoder's error, for its line) if it is malformed, repeats a key or nests too deeply."""
    try:
        return DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where(e)}: malformed JSON ({e.msg}, column {e.colno})") from None
    except RepeatedKey as e:
        raise DataError(f"{where(None)}: {e}") from None
    except RecursionError:
        raise DataError(f"{where(None)}: JSON nested too deeply to read") from None


def read_records(path):
    """[(where, object)]: the objects of a .jsonl file, one a line, or of a .json file, a JSON
    array of objects (or one object a line); where names the file and line, or element. An
    object over MAX_LINE characters is refused, in either."""
    text = read_text_file(path)
    head = text.lstrip()[:1]
    if path.lower().endswith(".json") and head == "[":
        array = decoded(text, lambda e: f"{path}:{e.lineno}" if e else path)
        records = [(f"{path}: element {i}", item) for i, item in enumerate(array)]
        for where, item in records:
            if len(json.dumps(item)) > MAX_LINE:
                raise DataError(f"{where}: {len(json.dumps(item)):,} characters, over the "
                                f"{MAX_LINE:,} a sample may have")
        return records
    if path.lower().endswith(".json") and head != "{":
        raise DataError(f"{path}: neither a JSON array of objects nor one JSON object per line")
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if len(line) > MAX_LINE:
            raise DataError(
                f"{where}: a line of {len(line):,} characters, over the {MAX_LINE:,} a sample may "
                "have")
        records.append((where, decoded(line, lambda e: where)))
    return records


def text_field(record, name, where, default=None):
    """record[name], a string; default where it is missing (None: it must be there)."""
    if name not in record and default is not None:
        return default
    if name not in record:
        raise DataError(f"{where}: field {name!r} is missing (fields here: {sorted(record)})")
    if not isinstance(record[name], str):
        raise DataError(
            f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")
    return record[name]


def templated(template, prompt, context=""):
    """The prompt a template makes: plain, the prompt then a newline between it and the
    completion (none where the prompt already ends in white space); alpaca, the Alpaca
    prompt of an instruction and its input."""
    if template == "alpaca":
        return (ALPACA_WITH_INPUT if context.strip() else ALPACA).format(instruction=prompt,
                                                                           input=context)
    return prompt if prompt[-1:].isspace() else prompt + "\n"


def prompt_and_completion(record, where, template, prompt_field, completion_field):
    """The record's (prompt, completion) text: its two fields, a newline between (plain), or
    the Alpaca prompt of its instruction and input, and its output (alpaca)."""
    if template == "plain":
        prompt = text_field(record, prompt_field, where)
        return templated(template, prompt), text_field(record, completion_field, where)
    context = text_field(record, "input", where, default="")
    return (templated(template, text_field(record, "instruction", where), context),
            text_field(record, "output", where))


def record_texts(path, prompt_field, completion_field, template, answer_field, task):
    """(where, prompt, completion, answer, task) of every record of the file, each field
    checked: a DataError names the file and line or element at fault."""
    for where, record in read_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        prompt, completion = prompt_and_completion(record, where, template, prompt_field,
                                                   completion_field)
        answer = text_field(record, answer_field, where) if answer_field else ""
        if answer_field and not answer.strip():  # it could never be found in a response
            raise DataError(f"{where}: field {answer_field!r} (--answer-field) is empty")
        yield where, prompt, completion, answer, text_field(record, "task", where, default=task)


def check_data(config):
    """Read and check every data file a run names (--data, --test-data, --support-data)
    before any work: a bad line 37 must not cost a pretraining first."""
    paths = [config.data, config.support_data, config.dev_data, *config.test_data.split(",")]
    for path in filter(None, (p.strip() for p in paths)):
        if is_records(path):
            fields = (config.prompt_field, config.completion_field, config.template)
            for _ in record_texts(path, *fields, config.answer_field, ""):
                pass
        else:
            read_text_file(path)


# ---------------------------------------------------------------------------------------
# Records and text as Examples


def load_text(path, tokenizer, block_size):
    """A plain-text corpus cut into windows of block_size + 1 tokens (all carry loss)."""
    tokens = encode(tokenizer, read_text_file(path))
    if len(tokens) < 2:
        raise DataError(f"{path}: too short to train on ({len(tokens)} token)")
    # consecutive windows share one token, so every token but the first is a target once
    return [
        Example(tokens[i : i + block_size + 1], 0) for i in range(0, len(tokens) - 1, block_size)]


@dataclass
class TruncationStats:
    samples: int = 0  # samples longer than block_size + 1 tokens
    tokens: int = 0  # tokens cut from their ends
    # "file:line" of samples whose prompt leaves no completion token
    skipped: list = field(default_factory=list)


def load_records(path, tokenizer, block_size, prompt_field="prompt", completion_field="completion",
                 template="plain", answer_field="", train_on_inputs=False, task=""):
    """Prompt/completion records (read_records) as Examples.

    The completion is followed by <|endoftext|> so the model learns where to stop; the loss
    falls on completion tokens only (train_on_inputs: on the prompt too, as LLM-Adapters'
    default). answer_field: the field holding the answer that answer accuracy compares
    (LLM-Adapters' "answer"). task: the task of records that name none. Samples longer
    than block_size + 1 are cut at the end; one whose prompt leaves no completion token
    within the context is skipped (where kept). Returns (examples, TruncationStats).
    """
    examples, cut = [], TruncationStats()
    fields = (prompt_field, completion_field, template, answer_field, task)
    for where, prompt_text, completion, answer, name in record_texts(path, *fields):
        prompt = encode(tokenizer, prompt_text)
        tokens = prompt + encode(tokenizer, completion) + [tokenizer.eot_token]
        if len(tokens) > block_size + 1:
            cut.samples += 1
            cut.tokens += len(tokens) - (block_size + 1)
            tokens = tokens[: block_size + 1]
        example = Example(tokens, len(prompt), task=name, answer=answer,
                          prompt_loss=train_on_inputs)
        if n_targets(example) < 1:
            cut.skipped.append(where)
            continue
        examples.append(example)
    if not examples and cut.skipped:
        raise DataError(
            f"{path}: every prompt leaves no completion token within the model's context of "
            f"{block_size} tokens (first: {cut.skipped[0]}); shorten the prompts or use a base "
            "with a longer context (--block-size when train.py pretrains it)")
    if not examples:
        raise DataError(f"{path}: no samples (only blank lines)")
    return examples, cut
