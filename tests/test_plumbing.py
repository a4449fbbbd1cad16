import os
from dataclasses import dataclass

import pytest

from plumbing import files, settings
from plumbing.settings import ConfigError, like, option, parse_args


@dataclass
class Inner:
    rate: float = option(0.5, "a share")
    names: tuple = option(("a", "b"), "names")


@dataclass
class Outer(Inner):
    seeds: int = option(3, "how many seeds")
    copied: float = like(Inner, "rate")
    flag: bool = option(False, "a switch")


def test_atomic_save_onto_a_directory_fails_and_leaves_no_temporary_file(tmp_path):
    (tmp_path / "ckpt.pt").mkdir()
    with pytest.raises(OSError):
        files.atomic_save({"a": 1}, str(tmp_path / "ckpt.pt"))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_an_error_while_writing_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    files.write_json(str(path), {"a": 1})

    def broken(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        files.atomic_write(str(path), broken)
    assert path.read_text().replace(
        " ", "").replace("\n", "") == '{"a":1}' and os.listdir(tmp_path) == ["results.json"]


def test_flags_come_from_fields_with_their_defaults_and_help_declared_once():
    config = parse_args(Outer, ["--rate", "0.25", "--flag"])
    assert config == Outer(rate=0.25, flag=True) and config.copied == 0.5 and config.seeds == 3
    from dataclasses import fields

    helps = {f.name: f.metadata["help"] for f in fields(Outer)}
    assert helps["copied"] == helps["rate"]


@dataclass
class Commented:
    lr: float = 1e-2  # peak learning rate
    # a heading, not a help line
    steps: int = 600  # steps;
        # the schedule spans them
    quiet: bool = False


def test_help_comes_from_the_comments_beside_each_field_as_nanogpt_globals_read(capsys):
    assert settings.help_texts(Commented) == {
        "lr": "peak learning rate", "steps": "steps; the schedule spans them", "quiet": ""}
    with pytest.raises(SystemExit):
        parse_args(Commented, ["--help"])
    assert "the schedule spans them (default: 600)" in " ".join(capsys.readouterr().out.split())


def test_every_flag_of_train_py_has_its_help():
    from train import TrainConfig

    helps = settings.help_texts(TrainConfig)
    assert len(helps) > 60 and all(len(h) > 10 for h in helps.values()), [
        n for n, h in helps.items() if len(h) <= 10]


def test_flags_are_never_abbreviated_and_the_rest_can_be_passed_on():
    config, rest = parse_args(Outer, ["--seed", "7", "--seeds", "2", "--steps=3"], known_only=True)
    assert config.seeds == 2 and rest == ["--seed", "7", "--steps=3"]
    with pytest.raises(ConfigError, match="unrecognized arguments: --see 2"):
        parse_args(Outer, ["--see", "2"])


def test_range_checks_name_the_flag_and_catch_nan_and_inf():
    @dataclass
    class C:
        lr: float = 1.0
        ratio: float = 0.5

    assert settings.positive(C(lr=float("nan")), "lr") == ["--lr must be positive, got nan"]
    assert settings.positive(C(lr=float("inf")), "lr") == ["--lr must be positive, got inf"]
    assert settings.in_range(C(ratio=0.0), "ratio", 0, 1,
                             low_open=True) == ["--ratio must be in (0, 1], got 0.0"]
    assert settings.in_range(C(ratio=1.0), "ratio", 0, 1, low_open=True) == []
