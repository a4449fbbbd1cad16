"""The paper's setting: LLM-Adapters' JSON arrays, the Alpaca prompt, answer accuracy per
task, several evaluation files as tasks. Every file here is written by the tests."""

import json

import pytest

from data import Example, collate, get_tokenizer
from plumbing.records import load_records
from evaluation.scoring import answer_finders, evaluate
from plumbing.records import ALPACA, ALPACA_WITH_INPUT, read_records
from model import GPT, GPTConfig, IGNORE_INDEX
from train import main

TOK = get_tokenizer()


def commonsense(task, i):
    """A record in LLM-Adapters' layout (its commonsense_170k and <task>/test.json)."""
    answers = {"boolq": ["true", "false"], "piqa": ["solution1", "solution2"]}[task]
    answer = answers[i % 2]
    return {"instruction": f"{task} question {i}? Answer format: {'/'.join(answers)}", "input": "",
            "output": f"the correct answer is {answer}", "answer": answer}


def write_json(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return str(path)


def test_json_arrays_and_jsonl_give_the_same_examples(tmp_path):
    records = [{"prompt": f"q{i}=", "completion": f"a{i}"} for i in range(5)]
    array = write_json(tmp_path / "a.json", records)
    lines = tmp_path / "a.jsonl"
    lines.write_text("\n".join(map(json.dumps, records)))
    got = load_records(array, TOK, 32)[0]
    assert got == load_records(str(lines), TOK, 32)[0] and len(got) == 5
    # each element by its index
    assert [where for where, _ in read_records(array)][:2] == [
        f"{array}: element 0", f"{array}: element 1"]


@pytest.mark.parametrize(
    "text,message",
    [
        (
            '[{"instruction": "x", "output": "y"}, {"instruction": "x"}]',
            "element 1: field 'output' is missing",
        ),
        (
            '[{"instruction": "x", "output": 3}]',
            "element 0: field 'output' must be a string, got int",
        ),
        ('[{"instruction": "x", "output": "y"}, 7]', "element 1: expected a JSON object, got int"),
        (
            '[{"instruction": "x", "output": "y"},\n {"instruction": }]',
            "train.json:2: malformed JSON",
        ),
        ('"just a string"', "neither a JSON array of objects nor one JSON object per line"),
    ],
)
def test_a_bad_element_is_one_error_line_naming_file_and_index(base, tmp_path, capsys, text,
                                                               message):
    from conftest import TINY_FLAGS

    (tmp_path / "train.json").write_text(text)
    flags = ["--init-from", base, "--out-dir", str(tmp_path / "out"), *TINY_FLAGS]
    assert main([*flags, "--data", str(tmp_path / "train.json"), "--template", "alpaca"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_the_alpaca_prompt_with_and_without_input_and_the_loss_on_the_response(tmp_path):
    path = write_json(tmp_path / "t.json", [
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Add.", "input": "2 and 3", "output": "5"}])
    plain, with_input = load_records(path, TOK, 512, template="alpaca")[0]
    assert TOK.decode(plain.tokens[: plain.n_prompt]) == ALPACA.format(instruction="Say hi.")
    assert TOK.decode(plain.tokens[: plain.n_prompt]).endswith("### Response:\n")
    assert TOK.decode(with_input.tokens[: with_input.n_prompt]) == ALPACA_WITH_INPUT.format(
        instruction="Add.", input="2 and 3")
    assert "### Input:\n2 and 3\n\n" in TOK.decode(with_input.tokens)
    assert TOK.decode(plain.completion) == "hi<|endoftext|>"
    _, targets, _ = collate([plain], TOK.eot_token)
    assert (targets[0, : plain.n_prompt - 1] == IGNORE_INDEX).all()
    # --train-on-inputs: the prompt carries loss too
    inputs = load_records(path, TOK, 512, template="alpaca", train_on_inputs=True)[0][0]
    _, targets, _ = collate([inputs], TOK.eot_token)
    assert (targets[0] != IGNORE_INDEX).all()


# LLM-Adapters' extract_answer, written out from its patterns (commonsense_evaluate.py): the
# first match of the dataset's pattern in the stripped response, or "" where there is none
THEIR_PATTERNS = {"boolq": "true|false", "piqa": "solution1|solution2",
                  "social_i_qa": "answer1|answer2|answer3|answer4|answer5",
                  "hellaswag": "ending1|ending2|ending3|ending4", "winogrande": "option1|option2"}
RESPONSE_KINDS = {  # a kind of response: (task, response)
    "the answer alone": ("boolq", "true"), "after a sentence": ("piqa", "the answer is solution2"),
    "two candidates": ("social_i_qa", "answer3 or answer1"), "run-on": ("hellaswag",
                                                                         "ending4ending4"),
    "a longer number": ("social_i_qa", "answer12"), "capitalised": ("boolq", "True"),
    "with punctuation": ("winogrande", "option2."), "inside a word": ("boolq", "untrue"),
    "absent": ("piqa", "I do not know"), "empty": ("winogrande", ""),
    "not one of the file's": ("social_i_qa", "answer5, then answer2"),
    "in brackets": ("hellaswag", "(ending3)")}


@pytest.mark.parametrize("kind", RESPONSE_KINDS)
def test_on_llm_adapters_files_our_verdict_is_their_extract_answers(kind):
    """Every gold answer of every kind of response: right for us exactly where right for
    them. The candidates come from the whole file (social_i_qa's answers are answer1-3, yet
    their pattern, and ours, holds answer4 and answer5)."""
    import re

    golds = {"boolq": ("true", "false"), "piqa": ("solution1", "solution2"),
             "social_i_qa": ("answer1", "answer2", "answer3"),
             "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
             "winogrande": ("option1", "option2")}
    whole_file = [Example([1, 2], 1, task=t, answer=a) for t, answers in golds.items()
                  for a in answers]
    finders = answer_finders(whole_file)
    task, response = RESPONSE_KINDS[kind]
    theirs = re.findall(THEIR_PATTERNS[task], response.strip())
    theirs = theirs[0] if theirs else ""
    ours = finders[task].search(response)
    ours = ours.group(1) if ours else ""
    assert ours == theirs
    for gold in golds[task]:
        assert (ours == gold) == (theirs == gold)


def test_our_own_answers_are_found_as_whole_words_the_longest_first():
    examples = [
        Example([1, 2], 1, task="arc", answer=a) for a in ("answer1", "answer2", "answer10")
    ] + [Example([1, 2], 1, task="yn", answer=a) for a in ("yes", "no")]
    find = answer_finders(examples)
    first = lambda task, text: (m := find[task].search(text)) and m.group(1)
    assert first("arc", "the correct answer is answer2, not answer1") == "answer2"
    assert first("arc", "answer10 it is") == "answer10"  # the longest where two start at one place
    assert first("arc", "answer12 or answer1") == "answer1"  # whole words only
    assert first("yn", "it is not known; no") == "no"
    assert first("yn", "answer1") is None  # another task's answers are not candidates


def test_batched_answers_equal_one_by_one_answers():
    import torch

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    examples = []
    for i in range(12):  # prompts of three lengths, answers from two tasks
        prompt = TOK.encode("q" * (3 + i % 3) + "=")
        task, answer = ("a", "x") if i % 2 else ("b", "y")
        examples.append(
            Example(prompt + TOK.encode(answer + "\n"), len(prompt), task=task, answer=answer))
    batched = evaluate(model, examples, TOK, "cpu", True, batch_size=64, n_answers=12)
    alone = evaluate(model, examples, TOK, "cpu", True, batch_size=1, n_answers=12)
    assert batched["answers"] == alone["answers"] and batched["per_task"] == alone["per_task"]
    assert batched["accuracy"] == alone["accuracy"] and batched["accuracy"] is not None


def test_the_papers_command_runs_on_files_in_llm_adapters_layout(tmp_path, capsys, monkeypatch):
    train = write_json(tmp_path / "commonsense.json", [
        commonsense("boolq", i) for i in range(12)] + [commonsense("piqa", i) for i in range(12)])
    boolq = write_json(tmp_path / "boolq" / "test.json",
                       [commonsense("boolq", i) for i in range(6)])
    piqa = write_json(tmp_path / "piqa" / "test.json", [commonsense("piqa", i) for i in range(6)])
    from plumbing import report as report_module

    # progress lines however short the evaluation (by default, once it has run 30 s)
    progress = report_module.EvalProgress
    monkeypatch.setattr(report_module, "EvalProgress",
                        lambda config, split: progress(config, 0.0, split))
    out = tmp_path / "out"
    # a base of a context long enough for the Alpaca prompt, pretrained here in seconds
    shape = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "320"]
    shape += ["--pretrain-steps", "5", "--pretrain-until", "0"]
    flags = [*shape, "--out-dir", str(out), "--batch-size", "8", "--no-picture"]
    flags += ["--max-new-tokens", "8", "--eval-interval", "3", "--log-interval", "1"]
    assert (main([*flags, "--data", train, "--template", "alpaca", "--test-data", f"{boolq},{piqa}",
                  "--answer-field", "answer", "--epochs", "3"]) == 0)
    printed = capsys.readouterr().out
    assert "| accuracy" in printed and "  boolq " in printed and "  piqa " in printed
    assert "average" in printed and "answer accuracy" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 9  # ceil(3 x 24 / 8)
    assert set(metrics["per_task"]) == {"boolq", "piqa"}
    assert all(0 <= s["accuracy"] <= 1 for s in metrics["per_task"].values())
    assert all(s["n"] == 6 for s in metrics["per_task"].values())  # every record of each file
    assert "(dev sample)" in printed and "evaluating boolq: 6/6 responses" in printed
    for task in ("boolq", "piqa"):  # every response, a line per record in the file's order
        rows = [json.loads(line) for line in (out / "predictions" / f"{task}.jsonl").open()]
        assert [r["index"] for r in rows] == list(range(6))
        assert sum(r["right"] for r in rows) / 6 == metrics["per_task"][task]["accuracy"]
        assert all(r["right"] == (r["found"] == r["gold"]) for r in rows)
        assert rows[0]["prompt"].startswith("Below is an instruction")
    # sample.py reads a test file as the run read its data (alpaca, the answer field), unasked
    import sample

    assert sample.main(["--out-dir", str(out), "--data", boolq]) == 0
    assert "answer accuracy" in capsys.readouterr().out
    seen, real = [], GPT.generate  # --prompt goes in the run's template; --raw as it is given
    monkeypatch.setattr(GPT, "generate", lambda self, prompts, *args, **kw: seen.append(
        TOK.decode(prompts[0])) or real(self, prompts, *args, **kw))
    for raw in ([], ["--raw"]):
        assert sample.main(["--out-dir", str(out), "--prompt", "Is it so?", *raw]) == 0
    assert seen == [ALPACA.format(instruction="Is it so?"), "Is it so?"]
