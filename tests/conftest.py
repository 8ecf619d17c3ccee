"""Shared fixtures: the embedded tiny teachers built with their real processors (plain helpers: helpers.py)."""

import pytest
import torch

from linmu_cli.tiny import TINY_FAMILIES, build_tiny_teacher


@pytest.fixture(scope="session", params=TINY_FAMILIES)
def tiny(request):
    """(family, teacher, processor) for each embedded tiny family."""
    model, processor = build_tiny_teacher(request.param, seed=0)
    return request.param, model, processor


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
