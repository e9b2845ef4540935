"""Shared test helpers."""
from pathlib import Path

import pytest


def find_data_or_skip(name: str) -> Path:
    """The real data set ``name`` (e.g. 'voc-mini'), or skip the test when it is not on this machine."""
    from tinyrefine.data import find_data_root
    root = find_data_root(name)
    if root is None:
        pytest.skip(f"{name} not found: set TINYREFINE_DATA or put shared/data beside the repo")
    return root


@pytest.fixture
def data_root():
    """``data_root('voc-mini')`` -> Path, skipping the test if the data set is absent."""
    return find_data_or_skip
