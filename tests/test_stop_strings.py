"""One stop-string rule for the evaluation, the command line and the server: the earliest occurrence of
any stop string ends the text, which does not include it (OpenAI's rule); text that arrives in pieces
holds back only what could still become a stop string."""

from __future__ import annotations

import random

import pytest

from interleaf.generation import StopCutter, cut_at_stop, find_stop, split_at_stop
from interleaf.serving.rows import Row
from interleaf.serving.jobs import Job


@pytest.mark.parametrize("text, stop, expected", [
    ("red\nQuestion: x", ["Question", "\n"], "red"),  # the earliest match, whatever the order of the list
    ("red\nQuestion: x", ["\n", "Question"], "red"),
    ("abcd", ["cd", "bc"], "a"),  # overlapping stops: the one that starts first
    ("abcd", ["", "d"], "abc"),  # an empty stop string is no stop string
    ("abcd", [], "abcd"),
    ("abcd", ["x"], "abcd"),
    ("abab", ["ab"], ""),
])
def test_cut_at_stop_takes_the_earliest_occurrence(text, stop, expected):
    assert cut_at_stop(text, stop) == expected
    assert find_stop(text, stop) == (len(expected) if expected != text else -1)


def test_split_at_stop_holds_back_only_a_possible_stop_string():
    assert split_at_stop("hello wor", ["world"]) == ("hello ", False)
    assert split_at_stop("hello wor", ["world"], final=True) == ("hello wor", False)
    assert split_at_stop("hello world!", ["world"]) == ("hello ", True)
    assert split_at_stop("hello", ["world"]) == ("hello", False)  # nothing could start a stop string
    assert split_at_stop("aXab", ["abc", "Xa", "b!"]) == ("a", True)
    assert split_at_stop("xab", ["abc", "b!"]) == ("x", False)  # the longest possible beginning wins


def test_streamed_text_is_cut_as_the_whole_text_at_any_split():
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 16)))
        stop = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 3)))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 5))))
        cutter, out, stopped = StopCutter(stop), "", False
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            piece, stopped = cutter.feed(text[a:b])
            out += piece
            assert stop[0] not in out
            if stopped:
                break
        if not stopped:
            piece, stopped = cutter.feed("", final=True)
            out += piece
        assert (out, stopped) == (cut_at_stop(text, stop), find_stop(text, stop) >= 0), (text, stop, cuts)


def test_a_served_row_cuts_with_the_same_rule_and_waits_for_unfinished_characters():
    events: list[tuple] = []
    row = Row(Job(input_ids=[1], pixel_values=None, max_new_tokens=9, sink=events.append, stop=["cd", "bc"]), 0)
    assert not row.send("xa", final=False) and events == [("delta", 0, "xa")]
    assert not row.send("xab", final=False) and len(events) == 1  # "b" may begin "bc"
    assert row.send("xabcd", final=False) and len(events) == 1  # "bc" starts first: nothing more to send
    events.clear()
    row = Row(Job(input_ids=[1], pixel_values=None, max_new_tokens=9, sink=events.append, stop=["cd", "bc"]), 0)
    assert row.send("xabcd", final=False) and events == [("delta", 0, "xa")]  # not "xab": the earliest stop wins
    events.clear()
    row = Row(Job(input_ids=[1], pixel_values=None, max_new_tokens=9, sink=events.append, stop=["!"]), 1)
    assert not row.send("é\ufffd", final=False) and events == [("delta", 1, "é")]  # half a character waits
    assert not row.send("é\ufffd", final=True) and events[-1] == ("delta", 1, "\ufffd")
    row.finish("length")
    assert row.done and events[-1] == ("finish", 1, "length", 0)
