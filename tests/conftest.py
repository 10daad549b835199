import pyro
import pytest
import torch

#: lines that statistical tests add for the end-of-run table (``report`` fixture)
REPORT = pytest.StashKey[list]()


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


@pytest.fixture
def report(request):
    """A list: lines appended here are printed in a section at the end of the run (e.g. the
    simulation-based calibration table of tests/test_sbc.py under ``make test-slow``)."""
    return request.config.stash.setdefault(REPORT, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(REPORT, [])
    if lines:
        terminalreporter.section("statistical checks")
        for line in lines:
            terminalreporter.write_line(line)
