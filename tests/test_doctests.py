"""The docstring examples of the public API run and give what they show."""

import doctest
import inspect

import pytest

import enorm_jax
import enorm_jax.models

NAMESPACES = (enorm_jax, enorm_jax.contrib, enorm_jax.tracing, enorm_jax.models)


def _public_objects():
  for namespace in NAMESPACES:
    names = getattr(namespace, "__all__", None) or [
        n for n, v in vars(namespace).items()
        if not n.startswith("_") and inspect.isclass(v) and v.__module__ == namespace.__name__]
    for name in names:
      obj = getattr(namespace, name)
      if inspect.isfunction(obj) or inspect.isclass(obj):
        yield f"{namespace.__name__}.{name}", obj


@pytest.mark.parametrize("name,obj", list(_public_objects()), ids=lambda x: x
                         if isinstance(x, str) else "")
def test_docstring_examples(name, obj):
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  for test in doctest.DocTestFinder().find(obj, name, globs={}):
    runner.run(test)
  assert runner.failures == 0


def test_every_public_function_has_an_example():
  missing = [name for name, obj in _public_objects() if inspect.isfunction(obj)
             and ">>>" not in (obj.__doc__ or "")]
  assert not missing, missing
