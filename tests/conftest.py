"""Shared test set-up.

- Tiny models run fastest on one thread (above all on a busy 2-core machine).
- No test may leave a change behind in the process-wide state that later tests read: environment
  variables, torch's default dtype, its number of threads and its grad mode. Each is compared with
  its value before the test; a change is undone and the test fails, naming what it changed.
  (``monkeypatch.setenv`` and friends are undone before this check runs, so they are fine.)
"""

from __future__ import annotations

import os

import pytest
import torch

THREADS = 1
# Variables the tools themselves write, once per process: pytest's, rewritten at each phase of a
# test; torch's inductor cache directory, recorded the first time torch looks it up; and the two
# OpenMP settings scikit-learn sets when it is first imported.
IGNORED_ENV = frozenset({"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK"})


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


def _torch_state() -> dict[str, object]:
    return {"default dtype": torch.get_default_dtype(), "number of threads": torch.get_num_threads(),
            "grad mode": torch.is_grad_enabled()}


def _restore_torch(state: dict[str, object]) -> None:
    torch.set_default_dtype(state["default dtype"])  # type: ignore[arg-type]
    torch.set_num_threads(state["number of threads"])  # type: ignore[arg-type]
    torch.set_grad_enabled(state["grad mode"])  # type: ignore[arg-type]


def leaked_state(env_before: dict[str, str], torch_before: dict[str, object]) -> list[str]:
    """What differs from the snapshot, one line each (empty when nothing does)."""
    env_before = {k: v for k, v in env_before.items() if k not in IGNORED_ENV}
    env_after = {k: v for k, v in os.environ.items() if k not in IGNORED_ENV}
    problems = []
    for key in sorted(env_before.keys() | env_after.keys()):
        if key not in env_after:
            problems.append(f"environment variable {key} was removed (it was {env_before[key]!r})")
        elif key not in env_before:
            problems.append(f"environment variable {key} was set to {env_after[key]!r} and left set")
        elif env_before[key] != env_after[key]:
            problems.append(f"environment variable {key} changed from {env_before[key]!r} to {env_after[key]!r}")
    torch_after = _torch_state()
    for name, value in torch_before.items():
        if torch_after[name] != value:
            problems.append(f"torch {name} changed from {value} to {torch_after[name]}")
    return problems


@pytest.fixture(autouse=True)
def no_leaked_global_state():
    env_before = dict(os.environ)
    torch_before = _torch_state()
    yield
    problems = leaked_state(env_before, torch_before)
    if problems:
        for key in set(os.environ) - set(env_before) - IGNORED_ENV:
            del os.environ[key]
        os.environ.update({k: v for k, v in env_before.items() if k not in IGNORED_ENV})
        _restore_torch(torch_before)
        pytest.fail("the test left process-wide state changed (restored now; use monkeypatch or restore it "
                    "in a finally block):\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a host name or open a connection raises (and is recorded)."""
    import socket

    attempts: list[str] = []

    def refuse(what):
        def call(*args, **kwargs):
            attempts.append(f"{what}{args[1:] if what.startswith('socket.') else args}")
            raise OSError(f"network access during a test that must stay offline: {what}")
        return call

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return attempts
