import csv
import json
import statistics

import pytest

from tools import compare as compare_module
from evaluation import scoring
from tools.compare import CompareConfig, compare, main
from conftest import TINY_FLAGS
from testbed.task import TASKS


def flags(base, **overrides):
    """train.py's flags for every run of a tiny comparison."""
    return [*TINY_FLAGS, "--init-from", base,
            *[f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]]


def test_compare_prints_a_table_and_writes_json_and_csv(base, tmp_path, capsys):
    config = CompareConfig(methods="lora,gast,gast:topk+heldout,data:batch", seeds=2, lrs="1e-2",
                           out_dir=str(tmp_path))
    rows = compare(config, flags(base, steps=3, noise=0.0))
    out = capsys.readouterr().out
    assert (
        "| row | selection | support | lr | exact match | vs lora (paired, 95%) | held-out loss |"
        in out
    )
    assert "| lora | - | - | 0.01 |" in out and "| gast | softmax | train | 0.01 |" in out
    assert ("| gast:topk+heldout | topk | heldout | 0.01 |" in out
            and "| data:batch | softmax | batch | 0.01 |" in out)
    assert "| 1.00 | - | - |" in out  # lora's coverage; no noisy flags, so no rates
    assert "[8/8]" in out and "eta" in out  # one progress line per run
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [(r["row"], r["method"], r["selection"], r["support"]) for r in saved["rows"]] == [
        ("lora", "lora", None, None), ("gast", "gast", "softmax", "train"),
        ("gast:topk+heldout", "gast", "topk", "heldout"),
        ("data:batch", "data", "softmax", "batch")]
    assert (len(saved["runs"]) == 8 and {r["seed"] for r in saved["runs"]} == {0, 1}
            and saved["dev_runs"] == [])
    assert saved["config"]["train"]["steps"] == 3  # every setting of the runs, by field name
    for run in saved["runs"]:  # each run's metrics carry the settings that made it
        assert (run["config"]["method"], run["config"]["selection"], run["config"]["support"]) == (
            run["method"], run["selection"] or "softmax", run["support"] or "train")
    lora = {r["seed"]: r for r in saved["runs"] if r["row"] == "lora"}
    for row in saved["rows"]:
        mine = [r for r in saved["runs"] if r["row"] == row["row"]]
        assert row["held_out_loss"] == pytest.approx(sum(r["held_out_loss"] for r in mine) / 2)
        # paired by seed, t with 1 degree of freedom
        diffs = [r["held_out_loss"] - lora[r["seed"]]["held_out_loss"] for r in mine]
        assert row["held_out_loss_vs_lora"] == pytest.approx(sum(diffs) / 2)
        assert row["held_out_loss_vs_lora_ci95"] == pytest.approx(
            12.706 * abs(diffs[0] - diffs[1]) / 2**0.5 / 2**0.5)
        assert [p["step"] for p in row["curve"]] == [
            3] and row["per_task_exact_match"].keys() == set(TASKS)
    with open(tmp_path / "compare.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["row"] for r in table] == ["lora", "gast", "gast:topk+heldout", "data:batch"]
    assert float(table[1]["held_out_loss"]) == pytest.approx(rows[1]["held_out_loss"])


def test_compare_picks_each_lr_on_the_dev_split_and_reports_on_the_test_split(base, tmp_path,
                                                                              monkeypatch):
    import train as train_module

    seen = []  # (split of the run, final evaluation or not, the words it was evaluated on)
    real_evaluate, real_train = scoring.evaluate, compare_module.train

    def evaluate(model, examples, *args, **kwargs):
        final = kwargs["candidates"] is examples  # the final: the whole split, its own candidates
        seen.append((phase[-1], final, {tuple(e.tokens) for e in examples}))
        return real_evaluate(model, examples, *args, **kwargs)

    phase = []

    def train(config, split="test", **kwargs):
        phase.append(split)
        return real_train(config, split=split, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    monkeypatch.setattr(compare_module, "train", train)
    config = CompareConfig(methods="lora,gast", seeds=1, lrs="1e-3,3e-2", out_dir=str(tmp_path))
    rows = compare(config, flags(base, steps=3))
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [(r["method"], r["lr"], r["split"]) for r in saved["dev_runs"]] == [
        ("lora", 1e-3, "dev"), ("lora", 3e-2, "dev"), ("gast", 1e-3, "dev"), ("gast", 3e-2, "dev")]
    for row in rows:  # the lr with the lowest dev loss, for each method
        tried = [r for r in saved["dev_runs"] if r["method"] == row["method"]]
        assert row["lr"] == min(tried, key=lambda r: r["held_out_loss"])["lr"]
        assert all(r["lr"] == row["lr"] and r["split"] == "test" for r in saved["runs"]
                   if r["method"] == row["method"])
    # the lr choice never sees the test split (the test runs' periodic evaluations are dev's)
    dev_seen = set().union(*(words for split, _, words in seen if split == "dev"))
    test_seen = set().union(*(words for split, final, words in seen if split == "test" and final))
    assert dev_seen and test_seen and not dev_seen & test_seen


def test_bad_comparison_flags_are_refused_before_any_run(base, tmp_path, capsys):
    code = main(["--out-dir", str(tmp_path), "--lrs", "1e-3,abc", "--methods",
                 "gast:best,lora,lora:topk,gast:topk+random", "--seeds", "0", *flags(base)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ")
    for expected in ("--lrs must be comma-separated numbers, got '1e-3,abc'",
                     "--methods: unknown gast:best, lora:topk, gast:topk+random",
                     "--seeds must be positive"):
        assert expected in err
    assert not (tmp_path / "compare").exists()
    assert main(["--out-dir", str(tmp_path), "--lrs", "0,1e-3", *flags(base)]) == 2
    assert "--lrs must all be positive" in capsys.readouterr().err


def test_the_default_rows_are_the_papers_rule_and_its_ablations():
    rows = compare_module.rows_of(CompareConfig())
    assert [spec for spec, _, _ in rows] == ["lora", "lisa", "ist", "data", "gast", "gast:random",
                                             "gast:topk", "gast:heldout"]


# train.py's flags are checked before the first run
@pytest.mark.parametrize("flags,message", [
    (["--seeds", "-1"], "--seeds must be positive"),
    (["--lrs", "inf"], "--lrs must all be positive"),
    (["--methods", "gast:heldout+batch"], "--methods: unknown gast:heldout+batch"),
    (["--steps", "-3"], "--steps must be positive, got -3"),
    (["--n-layer", "1000000"], "pretraining this base needs at least about"),
    (["--seeds", "two"], "argument --seeds: invalid int value: 'two'")])
def test_bad_comparison_input_is_one_error_line_before_any_run(capsys, base, tmp_path, flags,
                                                               message):
    assert main(["--out-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "compare").exists()


def same_figures(a, b):
    """Two tables equal but for the times (and with nan equal to nan)."""
    strip = lambda rows: json.dumps(
        [{k: v for k, v in r.items() if k not in ("ms_per_step", "train_seconds")} for r in rows])
    return strip(a) == strip(b)


def test_a_continued_comparison_equals_an_uninterrupted_one_and_runs_only_what_is_missing(
    base, tmp_path, capsys):
    settings = dict(methods="lora,gast", lrs="1e-3,3e-2")
    whole = compare(CompareConfig(seeds=2, out_dir=str(tmp_path / "whole"), **settings),
                    flags(base, steps=3))
    # stopped after seed 0
    compare(CompareConfig(seeds=1, out_dir=str(tmp_path / "parts"), **settings),
            flags(base, steps=3))
    capsys.readouterr()
    continued = compare(CompareConfig(seeds=2, out_dir=str(tmp_path / "parts"), resume=True,
                                      **settings), flags(base, steps=3))
    out = capsys.readouterr().out
    # 4 dev + 2 test read back
    assert (out.count("(recorded before, not run again)") == 6
            and out.count("[") - out.count("(recorded") >= 2)
    assert same_figures(whole, continued)
    # without --resume or --overwrite: refused
    with pytest.raises(Exception, match="already holds compare.json"):
        compare(CompareConfig(seeds=2, out_dir=str(tmp_path / "parts"), **settings),
                flags(base, steps=3))


def test_jobs_in_processes_give_the_results_of_one_process_at_one_thread(base, tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = compare(CompareConfig(methods="lora,gast", seeds=2, lrs="1e-2",
                                    out_dir=str(tmp_path / "one")), flags(base, steps=3))
    finally:
        torch.set_num_threads(threads)
    two = compare(CompareConfig(methods="lora,gast", seeds=2, lrs="1e-2", jobs=2,
                                out_dir=str(tmp_path / "two")), flags(base, steps=3))
    assert same_figures(one, two)


def test_a_diverged_dev_run_loses_its_lr_and_the_comparison_goes_on(base, tmp_path, monkeypatch,
                                                                    capsys):
    real = compare_module.train

    def train(flags, *args, **kwargs):
        if ("--lr" in flags and flags[
            flags.index("--lr") + 1] == repr(3e-2) and not kwargs.get("dry_run")):
            raise FloatingPointError("step 1: the loss is nan")
        return real(flags, *args, **kwargs)

    monkeypatch.setattr(compare_module, "train", train)
    rows = compare(CompareConfig(methods="lora", seeds=1, lrs="1e-3,3e-2", out_dir=str(tmp_path)),
                   flags(base, steps=3))
    assert rows[0]["lr"] == 1e-3 and "DIVERGED" in capsys.readouterr().out
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [r.get("diverged", False) for r in saved["dev_runs"]] == [False, True]


def test_lrs_from_reuses_the_lr_each_row_chose_in_an_earlier_comparison(base, tmp_path, capsys):
    earlier = tmp_path / "earlier.json"
    earlier.write_text(
        json.dumps({"rows": [{"row": "lora", "lr": 0.003}, {"row": "gast:topk", "lr": 0.03}]}))
    config = CompareConfig(methods="lora,gast:topk", seeds=1, lrs="1e-3,1e-2",
                           lrs_from=str(earlier), out_dir=str(tmp_path / "c"))
    compare(config, flags(base, steps=2))
    saved = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert saved["dev_runs"] == [] and [
        (r["row"], r["lr"]) for r in saved["runs"]] == [("lora", 0.003), ("gast:topk", 0.03)]
    assert [r["lr"] for r in saved["rows"]] == [
        0.003, 0.03] and "lr as chosen in" in capsys.readouterr().out
    assert (main(["--methods", "lora,ist", "--lrs-from", str(earlier), "--out-dir",
                  str(tmp_path / "d"), *flags(base)]) == 2)
    err = capsys.readouterr().err
    assert (f"--lrs-from {earlier} has no row ist" in err
            and not (tmp_path / "d" / "compare.json").exists())


def test_the_pairs_of_one_comparison_are_paired_by_seed_and_an_ablation_only_at_one_lr():
    def run(row, seed, em, loss):
        return {"row": row, "seed": seed, "exact_match": em, "held_out_loss": loss}

    runs = [run("gast", 0, 0.9, 0.20), run("gast", 1, 0.8, 0.30)]
    runs += [run("gast:random", 0, 0.7, 0.25), run("gast:random", 1, 0.7, 0.31)]
    runs += [run("gast:topk", s, 0.5, 0.5) for s in (0, 1)] + [run("lora", 0, None, None)]
    lrs = {"gast": 1e-2, "gast:random": 1e-2, "gast:topk": 3e-3, "lora": 1e-2}
    pairs = {p["pair"]: p for p in compare_module.pooled_pairs([(lrs, runs)])}
    softmax_random, softmax_topk = pairs["gast - gast:random"], pairs["gast - gast:topk"]
    assert softmax_random["exact_match_vs"] == pytest.approx(0.15)  # (0.2 + 0.1) / 2
    assert softmax_random["held_out_loss_vs"] == pytest.approx(-0.03)  # (-0.05 - 0.01) / 2
    assert softmax_random["exact_match_vs_ci95"] == pytest.approx(12.706 * 0.1 / 2**0.5 / 2**0.5)
    # 1e-2 against 3e-3: not the rule's doing; a run with no figure pairs with nothing
    assert (softmax_topk["n"], softmax_topk["unpaired"]) == (0, 1)
    assert pairs["gast - lora"]["n"] == 0 and pairs["gast - lora"]["exact_match_vs"] is None
    table = compare_module.format_pooled(list(pairs.values()), 1)
    assert "| gast - gast:random | 2 | +0.1500 ± " in table
    assert "| gast - gast:topk | 0 | n/a | n/a | 1 |" in table


def test_a_second_comparison_into_a_held_out_dir_is_refused_before_any_run(base, tmp_path,
                                                                          capsys, monkeypatch):
    """Two comparisons into one --out-dir: the second is refused at once (the first's lock),
    and nothing of the first is touched."""

    from filelock import FileLock

    (tmp_path / "compare.json").write_text("{}")  # the first's
    with FileLock(str(tmp_path / "run.lock"), timeout=0):
        ran = []
        monkeypatch.setattr(compare_module, "one_run", lambda *a: ran.append(a))
        code = main(["--methods", "lora", "--seeds", "1", "--lrs", "1e-2", "--out-dir",
                     str(tmp_path), "--overwrite", *flags(base)])
        assert code == 2 and not ran and "another run" in capsys.readouterr().err
    assert (tmp_path / "compare.json").read_text() == "{}"


def test_the_pairs_are_pooled_over_comparisons_seed_by_seed(tmp_path, capsys):
    """gast - lora and the ablation's pairs: each run minus its partner of the same
    comparison and seed, pooled over the files; a comparison whose two rows ran at different
    lrs adds no pair to an ablation's (gast - lora compares the methods at their own lrs)."""
    def comparison(name, scores, lrs):  # scores: {row: [(exact match, loss) by seed]}
        runs = [{"row": row, "seed": seed, "exact_match": em, "held_out_loss": loss}
                for row, by_seed in scores.items() for seed, (em, loss) in enumerate(by_seed)]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"rows": [{"row": r, "lr": lrs.get(r, 0.01)} for r in scores],
                                    "runs": runs}))
        return str(path)

    a = comparison("a", {"lora": [(0.7, 0.5), (0.8, 0.4)], "gast": [(0.8, 0.4), (0.8, 0.3)],
                         "gast:random": [(0.6, 0.6), (0.7, 0.5)],
                         "gast:heldout": [(0.9, 0.2), (0.9, 0.2)]}, {"gast:heldout": 0.003})
    b = comparison("b", {"lora": [(0.5, 0.9)], "gast": [(0.8, 0.5)], "gast:random": [(0.8, 0.7)],
                         "gast:heldout": [(1.0, 0.1)]}, {"lora": 0.003})
    pairs = {p["pair"]: p for p in compare_module.pooled_pairs(
        map(compare_module.read_comparison, [a, b]))}
    # gast - lora: +0.1, 0.0 (a) and +0.3 (b)
    assert pairs["gast - lora"]["n"] == 3
    assert pairs["gast - lora"]["exact_match_vs"] == pytest.approx(0.4 / 3)
    assert pairs["gast - lora"]["held_out_loss_vs"] == pytest.approx((-0.1 - 0.1 - 0.4) / 3)
    half = 4.303 * statistics.stdev([0.1, 0.0, 0.3]) / 3 ** 0.5  # t with 2 degrees of freedom
    assert pairs["gast - lora"]["exact_match_vs_ci95"] == pytest.approx(half)
    assert pairs["gast - gast:random"]["exact_match_vs"] == pytest.approx((0.2 + 0.1 + 0.0) / 3)
    # a's heldout ran at another lr: only b pairs, one pair, no interval
    heldout = pairs["gast:heldout - gast"]
    assert (heldout["n"], heldout["unpaired"], heldout["exact_match_vs_ci95"]) == (1, 1, None)
    assert heldout["exact_match_vs"] == pytest.approx(0.2)
    assert pairs["gast - gast:topk"]["n"] == 0  # neither file has the row
    assert main(["--pool", f"{a},{b}"]) == 0
    assert "| gast - lora | 3 | +0.1333 ±" in capsys.readouterr().out
    copy = tmp_path / "copy.json"
    copy.write_bytes(open(a, "rb").read())
    assert main(["--pool", f"{a},{copy}"]) == 2  # the same comparison twice: refused
    assert "is a comparison given before" in capsys.readouterr().err
    assert main(["--pool", a, "--seeds", "3", "--steps", "5"]) == 2
    assert "--pool runs nothing: --seeds --steps 5 would not be read" in capsys.readouterr().err
