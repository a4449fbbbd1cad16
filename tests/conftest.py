import os
import sys

import torch

# the project's modules sit at the top level, one file per concept
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# two threads; one a worker where pytest-xdist runs the suite in two processes (-n 2)
worker = os.environ.get("PYTEST_XDIST_WORKER")
torch.set_num_threads(1 if worker else min(2, torch.get_num_threads()))


import pytest  # noqa: E402

# The one tiny run of the suite: the default task at a size that runs in about a second.
# No picture (drawing it costs about as much as the run); the tests of the picture ask for it.
TINY = dict(
    steps=6,
    warmup_steps=2,
    batch_size=8,
    n_train=48,
    n_test=16,
    eval_interval=3,
    checkpoint_interval=3,
    log_interval=2,
    quiet=True,
    lisa_interval=2,
    picture=False,
    weak_base=True,  # the suite's bases are pretrained for seconds: they know few skills
)
TINY_FLAGS = [f"--{k.replace('_', '-')}" if v is True else f"--no-{k.replace('_', '-')}"
              if v is False else f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A base model pretrained for a few steps (enough for the plumbing), shared by the
    tests that run train.py."""
    from data import get_tokenizer
    from testbed.pretrain import BaseConfig, load_base

    out = tmp_path_factory.mktemp("base")
    _, path = load_base(BaseConfig(out_dir=str(out), pretrain_steps=20, quiet=True),
                        get_tokenizer(), "cpu")
    return path


@pytest.fixture(scope="session")
def taught_base(tmp_path_factory):
    """A base pretrained long enough (300 steps of 16, a few seconds) to hold the skills'
    beginnings: on the 20-step base the answers' letters are near uniform, and 30 steps of
    fine-tuning on 48 examples cannot move the held-out loss."""
    from data import get_tokenizer
    from testbed.pretrain import BaseConfig, load_base

    out = tmp_path_factory.mktemp("taught_base")
    _, path = load_base(BaseConfig(out_dir=str(out), pretrain_steps=300, pretrain_batch_size=16,
                                   quiet=True), get_tokenizer(), "cpu")
    return path


@pytest.fixture
def tiny(base, tmp_path):
    """tiny(**overrides) -> the tiny TrainConfig on the shared base, writing into tmp_path."""
    from train import TrainConfig

    def make(out=None, **overrides):
        return TrainConfig(
            **{**TINY, "init_from": base, "out_dir": str(out or tmp_path), **overrides})

    return make


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "distributed: runs several processes with torch.distributed (deselect with -m 'not "
        "distributed')")


@pytest.fixture(autouse=True)
def a_16_gib_machine(monkeypatch):
    """The memory checks see 16 GiB whatever the machine has, so that a shape refused here is
    refused everywhere (a large machine would otherwise start pretraining it)."""
    from plumbing import devices

    monkeypatch.setattr(devices, "memory_available", lambda device: 16 * 2**30)
