import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models: intra-op threading only costs time (badly so on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
