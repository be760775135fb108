"""Fixtures shared by the project's test files."""
import logging

import pytest


@pytest.fixture
def log(caplog):
    """diffusers' log lines, INFO and up (diffusers' logger does not propagate to pytest's handler by default)."""
    root = logging.getLogger("diffusers")
    before, root.propagate = root.propagate, True
    try:
        with caplog.at_level("INFO", logger="diffusers"):
            yield caplog
    finally:
        root.propagate = before
