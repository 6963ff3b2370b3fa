"""Shared by the infra tests: where the repo is and which Ray version everything must agree on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def pinned_ray() -> str:
    """The `ray==X.Y.Z` pin in constraints.txt: the version every image, manifest and client must run."""
    match = re.search(r"^ray==([0-9][0-9.]*)\s*$", (REPO / "constraints.txt").read_text(), re.M)
    assert match, "constraints.txt must pin ray==X.Y.Z"
    return match.group(1)
