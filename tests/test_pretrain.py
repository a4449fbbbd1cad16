"""pretrain.py: the base cache, bad bases, and your own data offline: a base of your shape
pretrained on your own corpus, then fine-tuned on your own JSONL."""

import argparse
import ast
import glob
import json
import os

import pytest
import torch

from testbed import pretrain
from train import main

CORPUS = "".join(f"Line {i}: the {w} fox jumps over the lazy dog near {v} trees.\n" for i, (
    w, v) in enumerate(zip(["quick", "slow", "red", "brown"] * 30, ["two", "three", "five"] * 40)))
SHAPE = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "48"]
PRETRAIN = ["--pretrain-steps", "3", "--pretrain-batch-size", "4"]
FINE_TUNE = ["--steps", "3", "--warmup-steps", "1", "--batch-size", "4", "--eval-interval", "3",
             "--heldout-size", "4", "--prompt-field", "question", "--completion-field", "answer"]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def qa_rows(n, long_at=()):
    return [{"question": ("why " * 40 if i in long_at else f"what is {i} plus one?"),
             "answer": f" {i + 1}"} for i in range(n)]


def test_pretrain_on_your_corpus_then_fine_tune_and_reuse_the_base_only_when_nothing_changed(
    tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(40))
    out = tmp_path / "out"
    argv = ["--out-dir", str(out), "--pretrain-data", str(tmp_path / "corpus.txt"), "--data", data,
            *SHAPE, *PRETRAIN, *FINE_TUNE]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert ("pretraining a base GPT" in first and "blocks 2" not in first
            and "2 blocks, width 32, context 48" in first)
    # the corpus's last 5%, evaluated during pretraining
    assert "held-out loss" in first and "tokens/s" in first
    # answers shown at the end
    assert "'what is" in first and "reference" in first or "(right)" in first
    bases = glob.glob(str(out / "base-*.pt"))
    assert len(bases) == 1
    shape = torch.load(bases[0], weights_only=True)["model_config"]
    assert (shape["n_layer"], shape["n_head"], shape["n_embd"],
            shape["block_size"]) == (2, 2, 32, 48)
    stamp = os.stat(bases[0]).st_mtime_ns

    # the same settings: the same base, not pretrained again
    assert main(argv + ["--overwrite"]) == 0
    assert "pretraining" not in capsys.readouterr().out and os.stat(bases[0]).st_mtime_ns == stamp
    # other settings: another base
    assert main(argv + ["--overwrite", "--pretrain-steps", "4"]) == 0
    assert ("pretraining a base GPT" in capsys.readouterr().out
            and len(glob.glob(str(out / "base-*.pt"))) == 2)
    # another corpus: another base
    (tmp_path / "corpus.txt").write_text(CORPUS + "One more line.\n")
    assert main(argv + ["--overwrite"]) == 0 and len(glob.glob(str(out / "base-*.pt"))) == 3


def test_a_prompt_longer_than_the_context_is_skipped_and_named(base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(40, long_at={2}))
    assert (main(
        ["--init-from", base, "--out-dir", str(tmp_path / "a"), "--data", data, *FINE_TUNE]) == 0)
    assert (
        f"{data}: skipped 1 samples whose prompt leaves no completion token within 33 tokens "
        f"({data}:3)" in capsys.readouterr().out)
    data = write_jsonl(tmp_path / "long.jsonl", qa_rows(5, long_at=range(5)))
    assert (main(
        ["--init-from", base, "--out-dir", str(tmp_path / "b"), "--data", data, *FINE_TUNE]) == 2)
    assert (
        f"error: {data}: every prompt leaves no completion token within the model's context of 32 "
        "tokens" in capsys.readouterr().err)


def test_text_data_ends_with_a_greedy_sample(base, tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    argv = ["--init-from", base, "--out-dir", str(tmp_path / "out"), "--data",
            str(tmp_path / "corpus.txt"), "--steps", "2", "--warmup-steps", "1", "--batch-size",
            "4", "--support", "batch"]
    assert main(argv) == 0
    line = [l for l in capsys.readouterr().out.splitlines()
            if "a greedy sample from a held-out prompt: " in l]
    assert len(line) == 1
    prompt = line[0].split("prompt: ")[1].split(" -> ")[0]
    # a piece of the corpus, then the model's words
    assert ast.literal_eval(prompt) in CORPUS and len(ast.literal_eval(prompt)) >= 8


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--n-layer", "6", "--block-size", "64"],
            [
                "--n-layer 6 contradicts the base model's 4",
                "--block-size 64 contradicts the base model's 32",
            ],
        ),
        (["--n-embd", "100", "--n-head", "3"], ["--n-embd 100 does not divide by --n-head 3"]),
        (["--n-layer", "-1"], ["--n-layer must not be negative"]),
    ],
)
def test_shape_flags_that_cannot_hold_are_refused(base, tmp_path, capsys, flags, message):
    assert main(["--init-from", base, "--out-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert all(m in err for m in message), err


def bad_bases(tmp_path):
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"model_config": {"n_embd": 10, "n_head": 3}, "model": {}}, tmp_path / "config.pt")
    # a class weights_only refuses
    torch.save(argparse.Namespace(payload="anything"), tmp_path / "pickle.pt")
    (tmp_path / "emptydir").mkdir()
    return {"text.pt": "not a checkpoint we read (the file is truncated or not a torch checkpoint)",
            "empty.pt": "not a checkpoint we read",
            "tensor.pt": "not a checkpoint of train.py (no model_config, model)",
            "config.pt": "its model_config or weights do not make a GPT",
            "pickle.pt": "it holds a Python object (argparse.Namespace) that is never loaded",
            "emptydir": "not a GPT-2 checkpoint we can load"}


def test_a_base_that_is_not_a_model_is_refused_with_its_name(capsys, tmp_path):
    for name, message in bad_bases(tmp_path).items():
        assert (pretrain.main(
            ["--init-from", str(tmp_path / name), "--out-dir", str(tmp_path / "out")]) == 2)
        err = capsys.readouterr().err
        assert f"--init-from {tmp_path / name}" in err and message in err, err
        assert len(err.strip().splitlines()) == 2  # "error: invalid settings:" and the one reason


def test_python_pretrain_py_makes_the_base_once_with_progress_and_an_eta(capsys, tmp_path):
    argv = ["--out-dir", str(tmp_path), "--pretrain-steps", "3", "--n-layer", "2"]
    assert pretrain.main([*argv, "--pretrain-until", "0"]) == 0  # one start
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "pretrain step" in line]
    assert len(lines) == 2 and all("tokens/s" in line and "eta" in line for line in lines)
    made = glob.glob(str(tmp_path / "base-*.pt"))
    assert len(made) == 1 and f"made: {made[0]}" in out and "2 blocks" in out
    assert pretrain.main([*argv, "--pretrain-until", "0"]) == 0  # found, not made again
    assert f"already there: {made[0]}" in capsys.readouterr().out
    assert torch.load(made[0], weights_only=True)["model_config"]["n_layer"] == 2


# --- bad input to pretrain.py, one table; the local GPT-2 directory loader's faults ---


def gpt2_directory(path, fault):
    """A tiny GPT-2 checkpoint in Hugging Face's layout, broken as `fault` says."""
    from test_model import tiny_model, write_hf_checkpoint

    path.mkdir()
    source = tiny_model(n_embd=128, n_head=2)
    write_hf_checkpoint(source, path)
    weights, config = path / "pytorch_model.bin", path / "config.json"
    if fault == "no weights":
        weights.unlink()
    elif fault == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif fault == "wrong shape":
        sd = torch.load(weights)
        sd["h.0.mlp.c_fc.weight"] = sd["h.0.mlp.c_fc.weight"][:, :-1]
        torch.save(sd, weights)
    elif fault == "config of another model":
        config.write_text(config.read_text().replace('"n_layer": 2', '"n_layer": 3'))
    elif fault == "config not json":
        config.write_text("{n_layer: 2")
    return str(path)


@pytest.mark.parametrize("fault,message", [
    ("no weights", "no GPT-2 checkpoint there (neither model.safetensors nor pytorch_model.bin)"),
    ("truncated weights", "not a GPT-2 checkpoint we can load"),
    ("wrong shape", "n_inner and n_embd make h.0.mlp.c_fc.weight (128, 512), but"),
    ("config of another model", "config.json: n_layer 3, but"),
    ("config not json", "JSONDecodeError")])
def test_a_broken_gpt2_directory_is_one_error_line(capsys, tmp_path, fault, message):
    path = gpt2_directory(tmp_path / "gpt2", fault)
    assert pretrain.main(["--init-from", path, "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (f"--init-from {path}: not a GPT-2 checkpoint we can load" in err and message in err
            and "Traceback" not in err), err


@pytest.mark.parametrize("flags,message", [
    (["--pretrain-steps", "-1"], "--pretrain-steps must not be negative"),
    (["--pretrain-lr", "nan"], "--pretrain-lr must be positive, got nan"),
    (["--n-embd", "100", "--n-head", "3"], "--n-embd 100 does not divide by --n-head 3"),
    (["--n-layer", "1000000"], "pretraining this base needs at least about"),
    (["--pretrain-data", "{tmp}"], "is a directory, not a file"),
    (["--pretrain-data", "{tmp}/nowhere.txt"], "no such file"),
    (["--tokenizer", "foo"], "--tokenizer 'foo' is unknown"),
    (["--n-layer", "x"], "argument --n-layer: invalid int value: 'x'")])
def test_bad_pretraining_settings_are_one_error_line_before_any_work(capsys, tmp_path, flags,
                                                                     message):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    (tmp_path / "corpus.txt").write_text("some text to pretrain on\n" * 50)
    assert pretrain.main(["--out-dir", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not list((tmp_path / "out").glob("base-*.pt")) if (tmp_path / "out").exists() else True


def test_another_pretrain_seed_makes_another_base_and_seed_0_the_one_of_before(tmp_path):
    from data import get_tokenizer
    from testbed.pretrain import BaseConfig, base_path

    tok = get_tokenizer()
    default = base_path(BaseConfig(out_dir="out"), tok)
    assert default == base_path(BaseConfig(out_dir="out", pretrain_seed=0), tok)
    # seed 0 at the old step count: the base of before, unchanged
    before = BaseConfig(out_dir="out", pretrain_steps=2500, pretrain_until=0)
    assert base_path(before, tok) == "out/base-67aea5f398.pt"
    assert base_path(BaseConfig(out_dir="out", pretrain_seed=1), tok) != default
    bases = []
    for seed in (0, 1):
        assert (pretrain.main(["--out-dir", str(tmp_path), "--pretrain-steps", "2",
                               "--pretrain-seed", str(seed), "--quiet"]) == 0)
    bases = sorted(tmp_path.glob("base-*.pt"))
    a, b = (torch.load(p, weights_only=True)["model"] for p in bases)
    assert len(
        bases) == 2 and not torch.equal(a["transformer.wte.weight"], b["transformer.wte.weight"])


# --- what a base knows: its skills ---


def test_pretraining_stores_its_skills_and_the_machine_that_made_it(tmp_path, capsys):
    argv = ["--out-dir", str(tmp_path), "--pretrain-steps", "30", "--pretrain-batch-size", "8"]
    assert pretrain.main(argv) == 0
    out = capsys.readouterr().out
    (path,) = glob.glob(str(tmp_path / "base-*.pt"))
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt["skills"]) == {"copy", "rev", "shift"}
    assert all(0 <= v <= 1 for v in ckpt["skills"].values())
    made = ckpt["made_by"]
    assert made["torch"] == torch.__version__ and made["threads"] == torch.get_num_threads()
    assert made["device"] == "cpu" and made["dtype"] == "float32" and made["starts"] == 3
    assert made["steps"] == 90  # no skills in 30 steps: three starts
    assert "the base's skills on fresh words: copy " in out
    table = out.strip().splitlines()[-6:]  # python -m testbed.pretrain ends with the skill table
    assert table[0] == "| skill | exact match on fresh words |" and table[2].startswith("| copy |")
    assert table[-1].startswith("(pretrained 90 steps in 3 start(s), torch ")
    assert pretrain.base_skills(path) == (ckpt["skills"], made)


def test_skill_prompts_are_fresh_words_with_the_skills_answers():
    from data import get_tokenizer
    from testbed.task import PRETRAIN_OPS

    tok = get_tokenizer()
    examples = pretrain.skill_examples(tok, 20, seed=3)
    assert [e.task for e in examples] == [s for s in PRETRAIN_OPS for _ in range(20)]
    corpus_words = {line.split()[1].split("=")[0] for line in data_lines()}
    for e in examples:
        skill, word = tok.decode(e.tokens[: e.n_prompt]).rstrip("=").split()
        assert tok.decode(e.completion) == PRETRAIN_OPS[skill](word) + "\n"
    words = {tok.decode(e.tokens[: e.n_prompt]).split()[1] for e in examples}
    assert len(words & corpus_words) <= 1  # another stream than the corpus's
    assert examples != pretrain.skill_examples(tok, 20, seed=4)


def data_lines():
    from testbed.task import pretrain_text

    return pretrain_text(20000, seed=pretrain.PRETRAIN_SEED).splitlines()


def test_a_start_that_does_not_learn_its_skills_in_time_is_followed_by_a_fresh_one(tmp_path,
                                                                                   capsys):
    argv = ["--out-dir", str(tmp_path), "--pretrain-steps", "25", "--pretrain-batch-size", "4"]
    assert pretrain.main([*argv, "--pretrain-starts", "2"]) == 0  # 25 steps: nothing learnt
    out = capsys.readouterr().out
    assert out.count("start 1 ended below 0.98: pretraining starts again") == 1
    assert out.count("the base's skills on fresh words") == 2 and "start 2 ended" not in out
    (path,) = glob.glob(str(tmp_path / "base-*.pt"))
    made = torch.load(path, weights_only=True)["made_by"]
    assert made["starts"] == 2 and made["steps"] == 50  # the last start is kept all the same
    # one start, whatever it knows
    assert pretrain.main([*argv, "--pretrain-until", "0", "--out-dir", str(tmp_path / "one")]) == 0
    assert "starts again" not in capsys.readouterr().out


def test_a_base_below_the_skill_level_is_refused_for_the_default_task_unless_asked(tmp_path,
                                                                                   capsys):
    argv = ["--out-dir", str(tmp_path), "--pretrain-steps", "20", "--steps", "2"]
    assert main([*argv, "--no-weak-base"]) == 2  # pretrained here: its skills are near 0
    err = capsys.readouterr().err
    assert "knows too little for the default task" in err and "rev 0.0" in err
    assert "--pretrain-seed" in err and "Traceback" not in err
    (base,) = glob.glob(str(tmp_path / "base-*.pt"))
    assert not os.path.exists(tmp_path / "ckpt.pt")
    # --weak-base takes it only as --init-from
    assert main([*argv, "--weak-base"]) == 2
    assert "--weak-base uses it anyway" not in capsys.readouterr().err
    assert main([*argv, "--init-from", base]) == 2
    assert "--weak-base uses it anyway" in capsys.readouterr().err
    assert main([*argv, "--init-from", base, "--weak-base", "--quiet"]) == 0


def test_prompts_that_cannot_fit_the_base_to_be_pretrained_are_refused_before_pretraining(
        tmp_path, capsys, monkeypatch):
    from testbed import pretrain

    monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("pretrained first"))
    data = write_jsonl(tmp_path / "long.jsonl", qa_rows(5, long_at=range(5)))
    assert main(["--out-dir", str(tmp_path / "b"), "--data", data, "--block-size", "32",
                 *FINE_TUNE]) == 2
    assert (f"error: {data}: every prompt leaves no completion token within the model's context "
            "of 32 tokens" in capsys.readouterr().err)
