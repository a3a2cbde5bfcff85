"""The docstring examples of the public API run and give what they show."""

import doctest
import importlib

import pytest

MODULES = ["enorm_jax.balance", "enorm_jax.baselines", "enorm_jax.chain", "enorm_jax.check",
           "enorm_jax.graph",
           "enorm_jax.trace", "enorm_jax.trace_core", "enorm_jax.transform"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.failed == 0
