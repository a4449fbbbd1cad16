import os
from dataclasses import dataclass

import pytest

from plumbing import files, settings
from plumbing.settings import ConfigError, option, parse_args


@dataclass
class Inner:
    rate: float = option(0.5, "a share")
    names: tuple = option(("a", "b"), "names")


@dataclass
class Outer(Inner):
    seeds: int = option(3, "how many seeds")
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
    assert config == Outer(rate=0.25, flag=True) and config.seeds == 3


def test_every_scripts_settings_are_declared_one_way_each_with_its_help(capsys):
    """Every flag of every script: option(default, help), the help shown by --help."""
    from dataclasses import fields

    from gradot.gradot import GradOTConfig
    from sample import SampleConfig
    from testbed.pretrain import BaseConfig
    from tools.compare import CompareConfig
    from train import TrainConfig

    for config_type in (TrainConfig, BaseConfig, CompareConfig, SampleConfig, GradOTConfig):
        short = [f.name for f in fields(config_type) if len(f.metadata.get("help", "")) <= 10]
        assert not short, (config_type.__name__, short)
    assert len(fields(TrainConfig)) > 60
    with pytest.raises(SystemExit):
        parse_args(TrainConfig, ["--help"])
    assert "continue from out_dir/ckpt.pt (default: False)" in " ".join(
        capsys.readouterr().out.split())


def test_a_renamed_flag_still_takes_its_former_name():
    from train import TrainConfig

    config = parse_args(TrainConfig, ["--val-data", "a.json", "--n-val", "7"])
    assert config.test_data == "a.json" and config.n_test == 7


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
