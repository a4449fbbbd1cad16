"""Bad input and accidents: special files, concurrent runs, overwrites, interrupts and
what the checks miss. Each case ends in one clear line and an exit code, with nothing
lost, and a hang fails its test (SIGALRM) instead of stalling the suite."""

import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from filelock import FileLock

from tools import compare
from gradot import gradot
import sample
from conftest import TINY_FLAGS
from train import main, train


@pytest.fixture(autouse=True)
def at_most_two_minutes():
    def hung(*_):
        raise TimeoutError("the case hung")

    signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield
    signal.alarm(0)


def refused(capsys, argv, runner=main, code=2):
    assert runner(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    return err


def dead_pid():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    return int(done.stdout)


@pytest.mark.parametrize("flag", ["--data", "--pretrain-data", "--init-from"])
def test_special_files_are_refused_by_name_before_any_work(tmp_path, capsys, flag):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    for path, what in ((fifo, "is a FIFO"), ("/dev/zero", "is a device"), (loop, "symlink loop")):
        err = refused(capsys, [flag, str(path), "--out-dir", str(tmp_path / "out")])
        assert what in err and flag in err, err
    assert not glob.glob(str(tmp_path / "out" / "base-*.pt"))


def test_bad_data_is_refused_before_the_base_is_pretrained(tmp_path, capsys):
    rows = [json.dumps({"prompt": f"q{i}", "completion": "a"}) for i in range(40)]
    rows[36] = '{"prompt": "q36"}'
    (tmp_path / "mine.jsonl").write_text("\n".join(rows))
    err = refused(capsys, ["--data", str(tmp_path / "mine.jsonl"), "--out-dir", str(tmp_path)])
    assert "mine.jsonl:37: field 'completion' is missing" in err
    assert not glob.glob(str(tmp_path / "base-*.pt"))  # no pretraining spent on it
    (tmp_path / "utf16.jsonl").write_bytes("hello".encode("utf-16"))
    err = refused(capsys, ["--data", str(tmp_path / "utf16.jsonl"), "--out-dir", str(tmp_path)])
    assert "UTF-16" in err and "save it as UTF-8" in err


def test_one_run_per_out_dir_and_a_killed_runs_lock_blocks_nothing(tiny, tmp_path, capsys):

    held = FileLock(str(tmp_path / "run.lock"), timeout=0)
    held.acquire()  # a live run holds it
    err = refused(capsys,
                  ["--init-from", tiny().init_from, "--out-dir", str(tmp_path), *TINY_FLAGS])
    assert f"--out-dir {tmp_path}: another run is writing there" in err
    assert not (tmp_path / "ckpt.pt").exists()
    held.release()  # as the kernel does when a run is killed: the file stays, unheld
    leftover = tmp_path / f"ckpt.tmp{dead_pid()}.pt"
    leftover.write_bytes(b"")
    train(tiny(quiet=False))
    assert not leftover.exists() and (tmp_path / "metrics.json").exists()


def test_sample_refuses_a_temperature_with_no_distribution_and_odd_adapters(tiny, tmp_path, capsys):
    train(tiny(tmp_path / "run"))
    run = str(tmp_path / "run")
    err = refused(capsys, ["--out-dir", run, "--prompt", "x", "--temperature", "1e-300"],
                  sample.main)
    assert "--temperature 1e-300: 0 (greedy) or at least 0.001" in err
    err = refused(capsys, ["--out-dir", run, "--prompt", ""], sample.main)
    assert "--prompt is empty" in err
    adapter = torch.load(tmp_path / "run" / "adapter.pt", weights_only=True)
    adapter["lora_config"]["rank_pattern"] = {}
    torch.save(adapter, tmp_path / "run" / "adapter.pt")
    err = refused(capsys, ["--out-dir", run], sample.main)
    assert "adapter.pt: does not fit the base model" in err


def test_what_the_checks_miss_is_one_line_with_a_hint_and_the_traceback_on_request(
    tiny, tmp_path, capsys, monkeypatch):
    from run import settle as settle_module

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr(settle_module, "load_task", broken)
    argv = ["--init-from", tiny().init_from, "--out-dir", str(tmp_path), *TINY_FLAGS]
    err = refused(capsys, argv)
    assert "error: RuntimeError: something nobody foresaw" in err and "GAST_TRACEBACK=1" in err
    monkeypatch.setenv("GAST_TRACEBACK", "1")
    with pytest.raises(RuntimeError):
        main(argv)
    FileLock(str(tmp_path / "run.lock"), timeout=0).acquire()  # the lock goes with the run


def test_a_checkpoint_with_a_nonsense_shape_is_one_line(tmp_path, capsys):
    torch.save({"model_config": {"n_head": 0, "n_embd": 64}, "model": {}}, tmp_path / "bad.pt")
    err = refused(capsys, ["--init-from", str(tmp_path / "bad.pt"), "--out-dir", str(tmp_path)])
    assert "n_head 0: must be at least 1" in err


def test_compare_and_gradot_refuse_duplicate_rows_and_impossible_settings(base, tmp_path, capsys):
    err = refused(capsys, ["--methods", "lora,lora", "--out-dir", str(tmp_path)], compare.main)
    assert "--methods: lora given twice" in err
    err = refused(capsys, ["--methods", "", "--out-dir", str(tmp_path)], compare.main)
    assert "unknown ''" in err
    for flags, message in [
        (["--lexicon", "1"], "--lexicon 1: give 0 or at least 30 facts"),
        (["--batch-size", "5000"], "--batch-size 5000 is larger than the 1000 fine-tuning"),
        (["--lams", ","], "--lams ',' names no lambda")]:
        err = refused(capsys, ["--init-from", base, "--out-dir", str(tmp_path), *flags],
                      gradot.main)
        assert message in err, err
    lrs = tmp_path / "lrs.json"
    lrs.write_text(json.dumps({"rows": [{"row": "lora", "lr": -1}]}))
    err = refused(capsys, ["--methods", "lora", "--lrs-from", str(lrs), "--out-dir", str(tmp_path)],
                  compare.main)
    assert f"--lrs-from {lrs}: its lrs must be positive (lora -1.0)" in err
    err = refused(capsys, ["--lrs-from", "/dev/zero", "--out-dir", str(tmp_path)], compare.main)
    assert "is a device" in err


def test_ctrl_c_in_compare_says_how_many_runs_are_recorded_and_how_to_go_on(base, tmp_path, capsys,
                                                                            monkeypatch):
    from test_compare import flags

    real, calls = compare.one_run, []

    def one_run(run_flags, split):
        if calls:
            raise KeyboardInterrupt
        calls.append(split)
        return real(run_flags, split)

    monkeypatch.setattr(compare, "one_run", one_run)
    argv = ["--methods", "lora", "--seeds", "2", "--lrs", "1e-2", "--out-dir", str(tmp_path)]
    err = refused(capsys, [*argv, *flags(base)], compare.main, code=130)
    assert "1 finished run(s) are recorded" in err and "tools.compare --resume" in err


def test_a_truncated_checkpoint_and_an_upper_case_suffix_are_understood(tiny, tmp_path, capsys):
    data = open(tiny().init_from, "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])  # as a kill -9 mid-copy leaves it
    err = refused(capsys, ["--init-from", str(tmp_path / "cut.pt"), "--out-dir", str(tmp_path)])
    assert "the file is truncated or not a torch checkpoint" in err
    rows = [json.dumps({"prompt": f"q{i}=", "completion": f"a{i % 3}"}) for i in range(40)]
    (tmp_path / "UPPER.JSONL").write_text("\n".join(rows))
    argv = ["--init-from", tiny().init_from, "--out-dir", str(tmp_path / "run"), *TINY_FLAGS]
    assert main([*argv, "--data", str(tmp_path / "UPPER.JSONL"), "--no-quiet"]) == 0
    assert "UPPER.JSONL as prompt/completion records" in capsys.readouterr().out


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                 "file data/0: file write failed"),
    OSError(28, "No space left on device")])
def test_a_full_disk_is_named_as_a_full_disk_and_nothing_written_is_lost(tiny, tmp_path, capsys,
                                                                         monkeypatch, error):
    import plumbing.files as files

    config = tiny(method="lora", steps=9, stop_at=6, eval_interval=3)
    assert train(config, summary=False)["steps"] == 6
    before = (tmp_path / "ckpt.pt").read_bytes()

    def full(obj, path):
        raise error

    monkeypatch.setattr(files.torch, "save", full)
    flags = [*TINY_FLAGS, "--init-from", config.init_from, "--out-dir", str(tmp_path),
             "--method", "lora", "--steps", "9", "--eval-interval", "3", "--resume"]
    err = refused(capsys, flags)
    assert "the disk is full" in err and "--resume continues" in err
    assert f"({tmp_path / 'ckpt.pt'})" in err  # the file it could not write
    assert (tmp_path / "ckpt.pt").read_bytes() == before and not list(tmp_path.glob("*.tmp*"))


def test_a_path_too_deep_or_too_long_is_refused_before_any_work(tmp_path, capsys):
    deep = os.path.join(str(tmp_path), *["d"] * 1400)
    err = refused(capsys, ["--out-dir", deep, "--steps", "1"])
    assert "--out-dir" in err and "cannot write there" in err
    long_name = str(tmp_path / ("x" * 300))
    err = refused(capsys, ["--out-dir", str(tmp_path / "none"), "--export-hf", long_name],
                  runner=sample.main)
    assert "--export-hf" in err and "File name too long" in err


def test_gradot_refuses_adapter_blocks_the_base_to_be_pretrained_cannot_hold_before_pretraining(
        tmp_path, capsys, monkeypatch):
    from testbed import pretrain

    monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("pretrained first"))
    err = refused(capsys, ["--adapter-blocks", "5", "--n-layer", "3", "--out-dir",
                           str(tmp_path)], runner=gradot.main)
    assert "--adapter-blocks 5: a model of 3 blocks takes exactly 1" in err


def test_a_base_with_nan_weights_or_epsilon_is_named_before_any_step(tiny, tmp_path, capsys):
    ckpt = torch.load(tiny().init_from, weights_only=False)
    ckpt["model"]["transformer.h.0.ln_1.weight"][0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    err = refused(capsys, ["--init-from", str(tmp_path / "nan.pt"), "--out-dir",
                           str(tmp_path / "out"), "--weak-base"])
    assert "transformer.h.0.ln_1.weight holds values that are not finite" in err
    ckpt = torch.load(tiny().init_from, weights_only=False)
    ckpt["model_config"]["layer_norm_epsilon"] = float("nan")
    torch.save(ckpt, tmp_path / "eps.pt")
    err = refused(capsys, ["--init-from", str(tmp_path / "eps.pt"), "--out-dir",
                           str(tmp_path / "out2"), "--weak-base"])
    assert "layer_norm_epsilon nan is not a positive number" in err


def test_a_test_file_of_training_records_is_refused_and_an_overlap_said(tiny, tmp_path, capsys):
    """A score on training records is no test score: --test-data whose every record is in
    --data is refused; a dev split carved from --data that shares some is said, counted."""
    rows = [json.dumps({"prompt": f"q{i}=", "completion": f"a{i}"}) for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows * 2))  # each record twice
    (tmp_path / "t.jsonl").write_text("\n".join(rows[:5]))
    flags = ["--init-from", tiny().init_from, "--data", str(tmp_path / "d.jsonl"), *TINY_FLAGS,
             "--out-dir", str(tmp_path / "out")]
    err = refused(capsys, [*flags, "--test-data", str(tmp_path / "t.jsonl")])
    assert f"--test-data {tmp_path / 't.jsonl'}: every record is also a training record" in err
    (tmp_path / "t.jsonl").write_text("\n".join(f'{{"prompt": "x{i}=", "completion": "b"}}'
                                                for i in range(5)))
    assert main([*flags, "--test-data", str(tmp_path / "t.jsonl"), "--no-quiet"]) == 0
    assert "records are also training records" in capsys.readouterr().out


def test_max_new_tokens_reaching_the_context_is_refused_before_training(tiny, tmp_path, capsys):
    rows = [json.dumps({"prompt": f"q{i}=", "completion": "a", "answer": "a"}) for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows))
    err = refused(capsys, ["--init-from", tiny().init_from, "--data", str(tmp_path / "d.jsonl"),
                           "--answer-field", "answer", "--max-new-tokens", "1000", *TINY_FLAGS,
                           "--out-dir", str(tmp_path / "out")])
    assert "--max-new-tokens 1000 is the base's whole context" in err
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_a_run_removes_only_the_prediction_files_a_run_wrote(tmp_path):
    """--resume and --overwrite write predictions/ anew: an earlier run's file of a task no
    longer there goes; a file of the user's beside them stays."""
    from evaluation.scoring import write_predictions

    def rows(task):
        return [{"task": task, "index": 0, "prompt": "p", "response": "r", "found": "",
                 "gold": "g", "right": False, "exact_match": False}]

    folder = tmp_path / "predictions"
    write_predictions(str(folder), rows("boolq") + rows("piqa"))
    (folder / "my_scores.jsonl").write_text("mine\n")
    write_predictions(str(folder), rows("boolq"))
    assert sorted(p.name for p in folder.iterdir()) == ["boolq.jsonl", "my_scores.jsonl",
                                                        "written.json"]
    assert (folder / "my_scores.jsonl").read_text() == "mine\n"


@pytest.mark.parametrize("script", ["train.py", "sample.py", "tools/bench.py", "tools/compare.py",
                                    "testbed/pretrain.py", "gradot/gradot.py"])
def test_every_script_runs_by_its_path_as_a_user_types_it(script):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, script, "--help"], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-500:]


def test_a_dev_file_of_test_records_is_refused(tiny, tmp_path, capsys):
    """compare.py chooses the lr on dev: dev made of the test split's records would choose it
    on the test split."""
    rows = [json.dumps({"prompt": f"q{i}=", "completion": f"a{i}"}) for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows))
    (tmp_path / "t.jsonl").write_text("\n".join(r.replace("q", "t") for r in rows[:5]))
    (tmp_path / "dev.jsonl").write_text((tmp_path / "t.jsonl").read_text())
    err = refused(capsys, ["--init-from", tiny().init_from, "--data", str(tmp_path / "d.jsonl"),
                           "--test-data", str(tmp_path / "t.jsonl"), "--dev-data",
                           str(tmp_path / "dev.jsonl"), *TINY_FLAGS, "--out-dir",
                           str(tmp_path / "out")])
    assert f"--dev-data {tmp_path / 'dev.jsonl'}: every record is also a test record" in err
    # a dev file sharing some test records: said, with the count
    (tmp_path / "dev.jsonl").write_text("\n".join(
        [r.replace("q", "v") for r in rows[5:10]] + [r.replace("q", "t") for r in rows[:2]]))
    assert main(["--init-from", tiny().init_from, "--data", str(tmp_path / "d.jsonl"),
                 "--test-data", str(tmp_path / "t.jsonl"), "--dev-data",
                 str(tmp_path / "dev.jsonl"), *TINY_FLAGS, "--out-dir", str(tmp_path / "out"),
                 "--no-quiet"]) == 0
    assert "2 of the dev split's 7 records are also test records" in capsys.readouterr().out


def test_a_full_disk_is_named_whoever_found_it():
    """What torch.save and safetensors raise on a full disk (seen on a 1 MiB tmpfs)."""
    from safetensors import SafetensorError

    from plumbing.entry import disk_full

    assert disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                  "576 vs 534"))
    assert disk_full(SafetensorError("Error while serializing: I/O error: No space left on "
                                     "device (os error 28)"))
    assert disk_full(OSError(28, "No space left on device")) and not disk_full(ValueError("x"))


def test_an_unwritable_predictions_folder_is_found_before_training(tiny, tmp_path, capsys,
                                                                   monkeypatch):
    """(As root a chmod stops nothing: a read-only file system does; the probe is stood in.)"""
    from plumbing import files

    probe = files.cannot_write
    monkeypatch.setattr(files, "cannot_write", lambda folder: "Read-only file system" if (
        folder.rstrip("/").endswith("predictions")) else probe(folder))
    (tmp_path / "predictions").mkdir()
    err = refused(capsys, ["--init-from", tiny().init_from, *TINY_FLAGS, "--overwrite",
                           "--out-dir", str(tmp_path)])
    assert "cannot write in its predictions/ (Read-only file system)" in err
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_disk_without_room_for_the_run_is_refused_before_the_first_step(tiny, tmp_path, capsys,
                                                                          monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=2**20))
    flags = [*TINY_FLAGS, "--init-from", tiny().init_from, "--out-dir", str(tmp_path / "out")]
    err = refused(capsys, flags)
    assert "1 MiB free, the run writes about 1" in err and "pick another --out-dir" in err
    assert not (tmp_path / "out" / "ckpt.pt").exists()
