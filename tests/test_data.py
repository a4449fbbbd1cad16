import json

import pytest
import tiktoken
from hypothesis import given, settings, strategies as st

import data
from data import Example, collate, encode, get_tokenizer
from plumbing.records import load_records, load_text
from plumbing.report import per_task_lines
from testbed.task import (PRETRAIN_OPS, TASKS, make_default_task, parse_tasks, pretrain_text,
                          task_answer)
from plumbing.records import DataError

TOK = get_tokenizer()


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_unicode_text_round_trips_through_the_default_tokenizer(text):
    ids = encode(TOK, text)
    assert all(0 <= i < 256 for i in ids)  # "<|endoftext|>" in text stays ordinary bytes
    assert TOK.decode(ids) == text


def test_the_default_tokenizer_has_an_end_of_text_token():
    assert TOK.n_vocab == 257 and TOK.eot_token == 256


def test_a_named_encoding_that_cannot_be_fetched_says_how_to_make_it_available(monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve host")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(data.TokenizerUnavailable, match="TIKTOKEN_CACHE_DIR") as e:
        get_tokenizer("gpt2")
    assert "--tokenizer bytes" in str(e.value)


def test_default_task_is_determined_by_its_seed_with_the_stated_noise():
    task = make_default_task(TOK, n_train=200, n_test=50, noise=0.25, seed=7, n_heldout=30,
                             n_dev=40)
    train, val = task.train, task.test
    again = make_default_task(TOK, n_train=200, n_test=50, noise=0.25, seed=7, n_heldout=30,
                              n_dev=40)
    other = make_default_task(TOK, n_train=200, n_test=50, noise=0.25, seed=8, n_heldout=30,
                              n_dev=40)
    for split in ("train", "test", "heldout", "dev"):
        assert [e.tokens for e in getattr(task, split)] == [e.tokens for e in getattr(again, split)]
        assert [e.tokens for e in getattr(task, split)] != [e.tokens for e in getattr(other, split)]
    assert (len(task.heldout), len(task.dev)) == (30, 40)
    assert sum(e.noisy for e in train) == 50
    assert not any(e.noisy for e in val + task.heldout + task.dev)

    for e in train + val + task.heldout + task.dev:
        name, word, answer = parts(e)
        assert (name == e.task and (answer == task_answer(word, name)) != e.noisy
                and len(answer) == len(word))
    words = [
        {parts(e)[1] for e in getattr(task, split)}
        for split in ("train", "test", "heldout", "dev")]
    assert sum(map(len, words)) == len(set().union(*words))  # the four splits share no word
    assert task_answer("abz", "rsh") == "acb"  # reverse, then each letter + 1
    assert [task_answer("abz", name) for name in TASKS] == ["abz", "zba", "cdb", "acb"]
    # each name is as long as a pretraining skill's, so its answer sits where the base's skills are
    assert all(len(name) in {len(op) for op in PRETRAIN_OPS} for name in TASKS)


def parts(e):
    """(task, word, answer) of a default-task example, read back from its text."""
    prompt, answer = TOK.decode(e.tokens[: e.n_prompt]), TOK.decode(e.completion)
    name, word = prompt.removesuffix("=").split(" ")
    return name, word, answer.removesuffix("\n")


def test_every_split_of_the_mixture_shares_its_samples_evenly_among_the_tasks():
    task = make_default_task(TOK, n_train=201, n_test=40, noise=0.0, seed=1, n_heldout=9, n_dev=40)
    for split in ("train", "test", "heldout", "dev"):
        counts = [sum(e.task == name for e in getattr(task, split)) for name in TASKS]
        assert max(counts) - min(counts) <= 1, (split, counts)
    names = [e.task for e in task.train]
    # the tasks are shuffled, not in turn
    assert names[:8] != [list(TASKS)[i % 4] for i in range(8)]


def test_tasks_chooses_a_subset_and_refuses_unknown_names():
    assert parse_tasks("all") == tuple(TASKS)
    assert parse_tasks("rsh, plus2") == ("plus2", "rsh")  # in TASKS' order
    task = make_default_task(TOK, n_train=50, n_test=10, noise=0.2, seed=0, n_heldout=4, n_dev=4,
                             tasks=("plus2",))
    assert {e.task for e in task.train + task.test + task.heldout + task.dev} == {"plus2"}
    for bad in ("revshift", "", "plus2,nope", "shift"):
        with pytest.raises(ValueError, match="echo, inv, plus2, rsh"):
            parse_tasks(bad)
    from run.checks import data_problems
    from train import TrainConfig

    assert any("--tasks nope" in p for p in data_problems(TrainConfig(tasks="nope")))
    assert data_problems(TrainConfig(tasks="plus2,rsh")) == []


def test_pretraining_corpus_teaches_the_known_operations_only():
    lines = pretrain_text(300, seed=0).splitlines()
    ops = {line.split()[0] for line in lines}
    assert ops == set(PRETRAIN_OPS) and not ops & set(TASKS)
    for line in lines:
        op, rest = line.split(" ")
        word, answer = rest.split("=")
        assert PRETRAIN_OPS[op](word) == answer


def test_collate_masks_prompt_and_padding_and_shifts_targets():
    a = Example([1, 2, 3, 4, 5], n_prompt=3)
    b = Example([6, 7, 8], n_prompt=1, noisy=True)
    x, y, noisy = collate([a, b], pad_id=0)
    assert x.tolist() == [[1, 2, 3, 4], [6, 7, 0, 0]]
    assert y.tolist() == [[-100, -100, 4, 5], [7, 8, -100, -100]]
    assert noisy.tolist() == [False, True]


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def test_jsonl_with_custom_field_names_puts_the_loss_on_completions_only(tmp_path):
    rows = [{"question": "2+2?", "answer": " 4"},
            {"question": "why? ", "answer": "because it is so, truly"}]
    path = write(tmp_path, "qa.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    examples, cut = load_records(path, TOK, block_size=12, prompt_field="question",
                                 completion_field="answer")
    assert len(examples) == 2
    # --template plain: a newline between prompt and completion, unless the prompt ends in one
    # or another white space
    assert TOK.decode(examples[0].tokens) == "2+2?\n 4<|endoftext|>" and examples[0].n_prompt == 5
    assert TOK.decode(examples[1].tokens).startswith("why? because")
    x, y, _ = collate(examples, pad_id=TOK.eot_token)
    assert TOK.decode([t for t in y[0].tolist() if t != -100]) == " 4<|endoftext|>"
    # the second sample is 5 + 23 + 1 = 29 tokens, cut to block_size + 1 = 13
    assert (cut.samples, cut.tokens) == (1, 29 - 13)
    assert len(examples[1].tokens) == 13 == y.shape[1] + 1


def test_text_file_becomes_windows_that_cover_every_token(tmp_path):
    text = "hello world, " * 20
    windows = load_text(write(tmp_path, "corpus.txt", text), TOK, block_size=16)
    assert all(2 <= len(w.tokens) <= 17 and w.n_prompt == 0 for w in windows)
    joined = windows[0].tokens + [t for w in windows[1:] for t in w.tokens[1:]]
    assert TOK.decode(joined) == text


@pytest.mark.parametrize(
    "content,message",
    [
        (
            '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n',
            r"bad.jsonl:2: malformed JSON",
        ),
        (
            '{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n',
            r"bad.jsonl:3: field 'completion' is missing",
        ),
        (
            '{"prompt": "a", "completion": 3}\n',
            r"bad.jsonl:1: field 'completion' must be a string, got int",
        ),
        ('["prompt", "completion"]\n', r"bad.jsonl:1: expected a JSON object"),
        ("", r"bad.jsonl: file is empty"),
        ("\n  \n", r"bad.jsonl: file is empty"),
        (
            '{"prompt": "'
            + "p" * 17
            + '", "completion": "b"}\n{"prompt": "'
            + "p" * 40
            + '", "completion": "b"}\n',
            r"bad.jsonl: every prompt leaves no completion token within the model's context of 16 "
            r"tokens \(first: .*bad.jsonl:1\)",
        ),
        (
            b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n',
            r"bad.jsonl:2: not valid UTF-8",
        ),
    ],
)
def test_bad_jsonl_gets_a_clear_error_naming_file_and_line(tmp_path, content, message):
    path = write(tmp_path, "bad.jsonl", content)
    with pytest.raises(DataError, match=message):
        load_records(path, TOK, block_size=16)


def test_bad_text_files_get_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"empty.txt: file is empty"):
        load_text(write(tmp_path, "empty.txt", ""), TOK, 16)
    with pytest.raises(DataError, match=r"latin1.txt:3: not valid UTF-8"):
        load_text(write(tmp_path, "latin1.txt", b"ok\nok\ncaf\xe9\n"), TOK, 16)
    with pytest.raises(DataError, match=r"missing.txt: cannot read"):
        load_text(str(tmp_path / "missing.txt"), TOK, 16)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "completion": " c"}).encode() + b"\n\xff\n")
    # lines still count from the file's start
    with pytest.raises(DataError, match=r"bom.jsonl:2: not valid UTF-8"):
        load_records(str(path), TOK, 32)
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "completion": " c"}).encode() + b"\n")
    examples, _ = load_records(str(path), TOK, 32)
    assert TOK.decode(examples[0].tokens[: examples[0].n_prompt]) == "p\n"  # no BOM before it


def test_a_prompt_that_fills_the_context_is_skipped_and_its_line_kept(tmp_path):
    lines = [{"prompt": "a", "completion": "b"}, {"prompt": "p" * 40, "completion": "b"},
             {"prompt": "c", "completion": "d"}]
    path = write(tmp_path, "mixed.jsonl", "\n".join(json.dumps(r) for r in lines))
    examples, cut = load_records(path, TOK, block_size=16)
    assert len(examples) == 2 and cut.skipped == [f"{path}:2"]
    assert [TOK.decode(e.completion) for e in examples] == ["b<|endoftext|>", "d<|endoftext|>"]


def test_systematic_noise_is_another_tasks_answer_and_random_noise_is_unchanged():
    systematic = make_default_task(TOK, n_train=200, n_test=5, noise=0.25, seed=3, n_heldout=5,
                                   n_dev=5, noise_kind="systematic")
    plain = make_default_task(TOK, n_train=200, n_test=5, noise=0.25, seed=3, n_heldout=5, n_dev=5)
    again = make_default_task(TOK, n_train=200, n_test=5, noise=0.25, seed=3, n_heldout=5, n_dev=5,
                              noise_kind="random")
    # random is the default, as before
    assert [e.tokens for e in plain.train] == [e.tokens for e in again.train]
    noisy = [e for e in systematic.train if e.noisy]
    assert len(
        noisy) == 50 and [e.noisy for e in systematic.train] == [e.noisy for e in plain.train]
    for e in noisy:
        name, word, answer = parts(e)
        assert answer != task_answer(
            word, name) and answer in {TASKS[other](word) for other in TASKS if other != name}
    for e in (e for e in plain.train if e.noisy):
        name, word, answer = parts(e)
        assert answer != task_answer(word, name) and len(answer) == len(word)
    one = make_default_task(TOK, n_train=40, n_test=5, noise=0.5, seed=3, n_heldout=5, n_dev=5,
                            noise_kind="systematic", tasks=("plus2",))
    # a mixture of one: another pretraining skill's answer
    for e in (e for e in one.train if e.noisy):
        name, word, answer = parts(e)
        assert answer != task_answer(word,
                                     name) and answer in {op(word) for op in PRETRAIN_OPS.values()}


def test_the_per_task_table_gives_each_task_and_the_average_over_tasks():
    per_task = {"a": {"n": 10, "loss": 1.0, "exact_match": 0.5},
                "b": {"n": 30, "loss": 3.0, "exact_match": 1.0}}
    lines = per_task_lines(per_task)
    assert len(lines) == 4 and lines[1].split("|")[0].strip() == "a"
    average = [cell.strip() for cell in lines[-1].split("|")]
    # the mean over tasks (over samples: 2.5 and 0.875)
    assert average == ["average", "40", "2.0000", "0.750"]
    # one task: nothing beyond the overall line
    assert per_task_lines({"a": per_task["a"]}) == []
    no_em = per_task_lines({k: {**v, "exact_match": None} for k, v in per_task.items()})
    assert "exact match" not in no_em[0] and no_em[-1].count("|") == 2


# --- no silent wrong result in the data (issue 43) ---


def test_a_key_given_twice_and_an_oversized_array_element_are_refused_naming_where(
        tmp_path, monkeypatch):
    import plumbing.records as records

    (tmp_path / "a.jsonl").write_text('{"prompt": "x", "completion": "y"}\n'
                                      '{"prompt": "x", "prompt": "z", "completion": "y"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: the key 'prompt' is given twice"):
        records.read_records(str(tmp_path / "a.jsonl"))
    (tmp_path / "b.json").write_text('[\n  {"a": 1},\n  {"a": 1, "a": 2}\n]')
    with pytest.raises(DataError, match=r"b.json: the key 'a' is given twice"):
        records.read_records(str(tmp_path / "b.json"))
    monkeypatch.setattr(records, "MAX_LINE", 40)  # the cap of a .jsonl line, for arrays too
    (tmp_path / "c.json").write_text('[{"a": "short"},\n {"a": "' + "x" * 60 + '"}]')
    with pytest.raises(DataError, match=r"c.json: element 1: 69 characters, over the 40"):
        records.read_records(str(tmp_path / "c.json"))
    (tmp_path / "d.json").write_text('[{"a": 1},]')
    with pytest.raises(DataError, match="malformed JSON"):
        records.read_records(str(tmp_path / "d.json"))


def test_an_empty_answer_is_refused_and_answers_with_symbols_are_found(tmp_path):
    from evaluation.scoring import answer_finders
    from plumbing.records import record_texts

    (tmp_path / "e.jsonl").write_text('{"prompt": "q", "completion": "a", "answer": " "}\n')
    with pytest.raises(DataError, match=r"e.jsonl:1: field 'answer' \(--answer-field\) is empty"):
        list(record_texts(str(tmp_path / "e.jsonl"), "prompt", "completion", "plain", "answer", ""))
    examples = [Example([1, 2], 1, task="t", answer=a) for a in ("-1", "C++", "(B)", "true")]
    find = answer_finders(examples)["t"]
    found = {r: (m.group(1) if (m := find.search(r)) else None) for r in (
        "it is -1.", "C++ wins", "(B) is right", "untrue", "-10", "true.")}
    assert found == {"it is -1.": "-1", "C++ wins": "C++", "(B) is right": "(B)", "untrue": None,
                     "-10": None, "true.": "true"}


def test_flags_that_do_not_apply_and_evaluation_files_that_collide_are_refused(tmp_path):
    from run.checks import data_problems
    from train import TrainConfig

    for name in ("train.json", "corpus.txt"):
        (tmp_path / name).write_text("[]" if name.endswith("json") else "text")
    for folder in ("a/boolq", "b/boolq"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "test.json").write_text("[]")
    data, a, b = (str(tmp_path / p) for p in ("train.json", "a/boolq/test.json",
                                              "b/boolq/test.json"))

    def problems(**kw):
        return " ".join(data_problems(TrainConfig(**kw)))

    assert "more than once" in problems(data=data, test_data=f"{a},{a}")
    assert "would all be task 'boolq'" in problems(data=data, test_data=f"{a},{b}")
    assert "--prompt-field: --template alpaca reads" in problems(
        data=data, template="alpaca", prompt_field="question")
    assert "is read as plain text" in problems(data=str(tmp_path / "corpus.txt"),
                                               answer_field="answer")
    assert problems(data=data, template="alpaca", test_data=a) == ""
