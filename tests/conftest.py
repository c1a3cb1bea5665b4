"""Shared test set-up: one torch thread (tests are small; two threads only contend on a 2-core machine)."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
