"""The examples in `shared`'s docstrings are run, so they cannot drift from the code."""

import doctest
import importlib
import pkgutil

import pytest

import shared

MODULES = sorted(m.name for m in pkgutil.iter_modules(shared.__path__, "shared."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_package_has_examples():
    attempted = sum(doctest.testmod(importlib.import_module(n), report=False).attempted
                    for n in ("shared.tokenizers", "shared.lora"))
    assert attempted >= 5
