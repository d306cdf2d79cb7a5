import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the `tiny` helpers

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tok():
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def target():
    from tiny import tiny_model

    return tiny_model(seed=0)
