import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "dist: multi-process tests (torchrun, 2 CPU processes, gloo)")
