"""Shared test set-up.

- Tiny models run fastest on one thread (above all on a busy 2-core machine).
- No test may leave a change behind in the process-wide state that later tests read: environment
  variables, torch's default dtype, its number of threads and its grad mode. Each is compared with
  its value before the test; a change is undone and the test fails, naming what it changed.
  (``monkeypatch.setenv`` and friends are undone before this check runs, so they are fine.)
- What several modules need and is slow to make is made once per session and shared read-only:
  the synthetic corpora (``synth_corpus``) and the tiny OpenFlamingo pieces. A test that writes
  into a corpus takes a private copy (``synth_corpus.copy``); a write into a shared one fails the
  session. Tiny models are built by ``tests/tiny.py``, the one factory for every LM family.
- Code the tests share lives in ``tests/helpers/`` and ``tests/tiny.py``; no test module imports
  another test module or this file.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers.state import leaked_state, restore_env, restore_torch, torch_state

THREADS = 1


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_leaked_global_state():
    env_before = dict(os.environ)
    torch_before = torch_state()
    yield
    problems = leaked_state(env_before, torch_before)
    if problems:
        restore_env(env_before)
        restore_torch(torch_before)
        pytest.fail("the test left process-wide state changed (restored now; use monkeypatch or restore it "
                    "in a finally block):\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory):
    """``synth_corpus.get(**write_corpus_arguments)``: a synthetic corpus, written once per session
    for each distinct set of arguments and shared by every test that asks for the same one.

    Read-only: ``synth_corpus.copy(dst, **arguments)`` gives a test a copy it may write into. At
    the end of the session, a file added, removed or rewritten in a shared corpus is an error.
    """
    from helpers.corpus import SessionCorpora

    corpora = SessionCorpora(tmp_path_factory.mktemp("corpora"))
    yield corpora
    problems = corpora.changes()
    assert not problems, "a test wrote into a shared corpus (take synth_corpus.copy instead):\n  " + "\n  ".join(problems)


@pytest.fixture(scope="session")
def openflamingo_pieces(tmp_path_factory):
    """(a directory holding a tiny OpenFlamingo checkpoint.pt, its LLaMA lm/ and CLIP clip/; the
    checkpoint's state dict; the tokenizer's base vocabulary size). Read-only: convert into a
    directory of your own."""
    from helpers.openflamingo import write_pieces

    root = tmp_path_factory.mktemp("openflamingo")
    state, base = write_pieces(root)
    return root, state, base


@pytest.fixture
def fresh_dynamo():
    """For a test that compiles: afterwards, no compiled code is kept and the environment is as it was."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")  # transformers sets it when it compiles
    yield
    torch._dynamo.reset()  # compiled code belongs to this test's models only
    if before is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = before


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
