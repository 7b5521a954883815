"""Accuracy of the zoo defaults on the bundled digits: the issue's goals (slow) and a quick bound (default run)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "zoo_digits.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_zoo_digits", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture
def one_thread():
    # Tiny models: one thread is as fast, and immune to oversubscription when other processes share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("name", "epochs"), [("cnn_small", 3), ("lstm", 4), ("transformer", 8)])
def test_zoo_defaults_learn_the_digits_quickly(benchmark, one_thread, name, epochs):
    result = benchmark.train_on_digits(name, max_epochs=epochs)
    assert result.test_acc > 0.8


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn_small", "lstm", "transformer"])
def test_zoo_defaults_reach_the_digits_accuracy_goals(benchmark, one_thread, name):
    # The 3-minute budget is a speed goal: benchmarks/zoo_digits.py measures and reports it, no test times it.
    result = benchmark.train_on_digits(name)
    assert result.test_acc >= result.goal
