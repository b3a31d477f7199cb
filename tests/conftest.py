"""Shared test helpers: locating ../shared/data, and the `slow` marker."""
import os
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Tests never read or fill the user's persistent compilation cache (main.py subprocesses inherit this); tests of the
# cache pass their own directory.
os.environ["SCORE_SDE_JAX_CACHE"] = "off"

SHARED_DATA = pathlib.Path(os.environ.get("SCORE_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_data_path(*parts) -> pathlib.Path:
    """Path under ../shared/data; skips the test when missing, but fails under CI=true."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        msg = (f"offline data {path} is missing (set SCORE_SHARED_DATA or see the README section "
               f"'Offline data' to obtain it)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long test, run only with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: pass --runslow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
