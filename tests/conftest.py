import pyro
import pytest
import torch


def pytest_configure(config):
    # The suite's models are small: one torch thread avoids OpenMP overhead on 2 busy cores.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """No Pyro parameter leaks from one test into the next."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()
