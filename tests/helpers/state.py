"""Process-wide state a test must not leave changed: environment variables, torch's default dtype,
its number of threads and its grad mode (compared before and after each test by ``conftest.py``)."""

from __future__ import annotations

import os

import torch

# Variables the tools themselves write, once per process: pytest's, rewritten at each phase of a
# test; torch's inductor cache directory, recorded the first time torch looks it up; and the two
# OpenMP settings scikit-learn sets when it is first imported; the address inductor records for its
# compiled code's tensors, the first time it compiles.
IGNORED_ENV = frozenset({"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK",
                         "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"})


def torch_state() -> dict[str, object]:
    return {"default dtype": torch.get_default_dtype(), "number of threads": torch.get_num_threads(),
            "grad mode": torch.is_grad_enabled()}


def restore_torch(state: dict[str, object]) -> None:
    torch.set_default_dtype(state["default dtype"])  # type: ignore[arg-type]
    torch.set_num_threads(state["number of threads"])  # type: ignore[arg-type]
    torch.set_grad_enabled(state["grad mode"])  # type: ignore[arg-type]


def restore_env(env_before: dict[str, str]) -> None:
    for key in set(os.environ) - set(env_before) - IGNORED_ENV:
        del os.environ[key]
    os.environ.update({k: v for k, v in env_before.items() if k not in IGNORED_ENV})


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
    torch_after = torch_state()
    for name, value in torch_before.items():
        if torch_after[name] != value:
            problems.append(f"torch {name} changed from {value} to {torch_after[name]}")
    return problems
