"""The suite's guard against leaked process-wide state (tests/conftest.py, tests/helpers/state.py) sees what it must."""

from __future__ import annotations

import os

import torch
from helpers.state import leaked_state, torch_state


def test_guard_names_each_changed_variable_and_torch_setting(monkeypatch):
    monkeypatch.setenv("INTERLEAF_GUARD_CHANGED", "before")
    monkeypatch.setenv("INTERLEAF_GUARD_REMOVED", "here")
    monkeypatch.delenv("INTERLEAF_GUARD_ADDED", raising=False)
    env, state = dict(os.environ), torch_state()
    assert leaked_state(env, state) == []
    try:
        os.environ["INTERLEAF_GUARD_CHANGED"] = "after"
        del os.environ["INTERLEAF_GUARD_REMOVED"]
        os.environ["INTERLEAF_GUARD_ADDED"] = "new"
        torch.set_default_dtype(torch.float64)
        torch.set_grad_enabled(False)
        torch.set_num_threads(state["number of threads"] + 1)
        assert leaked_state(env, state) == [
            "environment variable INTERLEAF_GUARD_ADDED was set to 'new' and left set",
            "environment variable INTERLEAF_GUARD_CHANGED changed from 'before' to 'after'",
            "environment variable INTERLEAF_GUARD_REMOVED was removed (it was 'here')",
            "torch default dtype changed from torch.float32 to torch.float64",
            f"torch number of threads changed from {state['number of threads']} to {state['number of threads'] + 1}",
            "torch grad mode changed from True to False",
        ]
    finally:
        os.environ.pop("INTERLEAF_GUARD_ADDED", None)
        os.environ.update(INTERLEAF_GUARD_CHANGED="before", INTERLEAF_GUARD_REMOVED="here")
        torch.set_num_threads(state["number of threads"])
        torch.set_default_dtype(state["default dtype"])
        torch.set_grad_enabled(state["grad mode"])
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "rewritten by pytest at each phase")
    assert leaked_state(env, state) == []
