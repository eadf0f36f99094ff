"""Shared test helpers."""

import os
from pathlib import Path

import pytest
import torch

import ppa_hf  # noqa: F401  (registers "ppa")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(*parts) -> Path:
    """A file under ../shared/data (beside the checkout, as in CI); skip-free: a missing file fails the test."""
    path = SHARED_DATA.joinpath(*parts)
    assert path.exists(), f"offline data missing: {path} (CI lays ../shared beside the checkout)"
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
