"""Fixtures shared by several test folders."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """The README's demo dataset (launch.make_dataset with its defaults), built once."""
    from tests.golden.runs import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("data") / "demo")
