"""Shared test set-up: one torch thread (tests are small; two threads only contend on a 2-core machine)."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def keep_threads():
    """The command line and the chapters' set-up set the thread count for their run: restore it after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
