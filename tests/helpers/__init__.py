"""Code the tests share; no tests here.

A test module imports from this package, from ``tiny`` (the tiny-model factory) and from
``fuzz_profiles``, never from another test module or from ``conftest`` (a test checks this).
Fixtures shared between modules live in ``conftest.py``.
"""
