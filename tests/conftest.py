"""Shared fixtures for the method tests (helpers live in tests/support/methods.py)."""
from __future__ import annotations

import pytest
import torch

from tests.support.methods import fixed_batches, tiny_bert


@pytest.fixture
def single_thread():
    """Tiny tensors: intra-op threads only add overhead (the CI box has 2 cores). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model():
    """A randomly initialised BertForSequenceClassification (vocab 100, hidden 32, 2 layers, 2 labels)."""
    return tiny_bert()


@pytest.fixture
def batches():
    """Four fixed batches of 8 sequences of 12 token ids with a learnable label."""
    return fixed_batches()
