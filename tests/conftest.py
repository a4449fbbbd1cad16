import os
import sys

import torch

# the project's modules sit at the top level, one file per concept
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

torch.set_num_threads(min(2, torch.get_num_threads()))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A base model pretrained for a few steps (enough for the plumbing), shared by the
    tests that run train.py."""
    import train
    from data import get_tokenizer
    out = tmp_path_factory.mktemp("base")
    _, path = train.load_base(train.TrainConfig(out_dir=str(out), pretrain_steps=20, quiet=True), get_tokenizer(), "cpu")
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: runs several processes with torch.distributed (deselect with -m 'not distributed')")
