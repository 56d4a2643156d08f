import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "disabled")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from pretrain_utils import build_corpus
    return build_corpus(tmp_path_factory)
