"""Hypothesis settings and helpers shared by the ``test_fuzz_*`` property tests.

The normal test run uses the ``ci`` profile: a fixed number of examples per property (scaled per
test), derandomized so that every run tries the same inputs, and no example database (nothing is
written into the repository). ``make fuzz`` sets ``INTERLEAF_FUZZ_EXAMPLES`` (default 2000) and
``HYPOTHESIS_PROFILE=fuzz``: random inputs, that many examples per property.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

from interleaf.errors import InterleafError

# Hypothesis keeps caches (Unicode tables, constants found in the source) in its home folder,
# .hypothesis/ in the working directory by default: keep them out of the repository.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "interleaf-hypothesis"))

_FUZZ_EXAMPLES = os.environ.get("INTERLEAF_FUZZ_EXAMPLES")
_COMMON = dict(
    deadline=None,  # a slow example is not a bug; a hang is caught by the per-test timeout
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture],
)
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("fuzz", derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fuzz" if _FUZZ_EXAMPLES else "ci"))


def examples(ci: int) -> int:
    """Examples for one property: ``ci`` in the normal run, ``INTERLEAF_FUZZ_EXAMPLES`` under ``make fuzz``."""
    return int(_FUZZ_EXAMPLES) if _FUZZ_EXAMPLES else ci


def timeout(ci: int, seconds_per_example: float) -> pytest.MarkDecorator:
    """A per-test timeout that grows with the number of examples (a hang fails the test)."""
    return pytest.mark.timeout(int(60 + examples(ci) * seconds_per_example))


def assert_named_error(error: BaseException) -> None:
    """The only failure a property accepts: interleaf's own error, with a message."""
    if not isinstance(error, InterleafError):
        raise AssertionError(f"{type(error).__name__} escaped instead of an interleaf error: {error!r}") from error
    assert str(error).strip(), f"{type(error).__name__} with an empty message"
    cause = error
    while cause is not None:  # an input that makes us run out of memory is a bug, even when wrapped
        if isinstance(cause, MemoryError):
            raise AssertionError(f"the input exhausted memory: {error}") from error
        cause = cause.__cause__


def _listing(root: Path, skip: Path | None = None) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if skip is not None and (here == skip or skip in here.parents):
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if d not in (".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis")]
        out.update(str(here / name) for name in filenames + dirnames)
    return out


@pytest.fixture
def sandbox(tmp_path):
    """The test's own output folder; the test fails if anything else under pytest's temporary
    folder, or at the top of the working directory, appeared or disappeared meanwhile."""
    parent = tmp_path.parent
    cwd = Path.cwd()
    before = (_listing(parent, skip=tmp_path), set(os.listdir(cwd)))
    yield tmp_path
    after = (_listing(parent, skip=tmp_path), set(os.listdir(cwd)))
    assert after[0] == before[0], f"written outside the test's folder: {sorted(after[0] ^ before[0])[:5]}"
    assert after[1] == before[1], f"written into the working directory: {sorted(after[1] ^ before[1])[:5]}"
