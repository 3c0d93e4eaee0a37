"""Log chunking (``_logs._Lines``) and option checks (``_logs.LogOptions``)."""

from __future__ import annotations

import datetime

import pytest

from otterscale.agent._errors import InvalidRequestError
from otterscale.agent._runtime._logs import CHUNK, LogOptions, _Lines


def test_complete_lines_go_out_at_once_partial_lines_wait() -> None:
    lines = _Lines()
    assert lines.add(b"one\ntwo\nthr", now=1.0) == [b"one\ntwo\n"]
    assert lines.partial_since == 1.0
    assert lines.add(b"ee", now=1.05) == []
    assert lines.partial_since == 1.0  # the partial line's age counts from its first byte
    assert lines.add(b"\nfour", now=1.2) == [b"three\n"]
    assert lines.partial_since == 1.2
    assert lines.flush() == b"four"
    assert lines.partial_since is None


def test_chunks_are_at_most_32_kib_and_end_at_a_newline_where_possible() -> None:
    line = b"x" * 99 + b"\n"  # 100 bytes
    data = line * 1000  # 100,000 bytes: more than three chunks
    out = _Lines().add(data, now=0.0)
    assert b"".join(out) == data
    assert all(len(chunk) <= CHUNK for chunk in out)
    assert all(chunk.endswith(b"\n") for chunk in out)
    assert len(out[0]) == (CHUNK // 100) * 100


def test_a_line_longer_than_a_chunk_is_cut() -> None:
    lines = _Lines()
    out = lines.add(b"y" * (CHUNK + 10), now=0.0)
    assert out == [b"y" * CHUNK]
    assert lines.flush() == b"y" * 10


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (LogOptions(tail_lines=-1), "tail_lines must not be negative"),
        (LogOptions(limit_bytes=0), "limit_bytes must be at least 1"),
        (LogOptions(since_seconds=0), "since_seconds must be at least 1"),
        (
            LogOptions(since_seconds=5, since_time=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)),
            "not both",
        ),
    ],
)
def test_bad_options(options: LogOptions, fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match=fragment):
        options.check()


def test_options_become_pod_log_parameters() -> None:
    options = LogOptions(
        follow=True,
        timestamps=True,
        tail_lines=0,
        since_time=datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        limit_bytes=100,
    )
    options.check()
    assert options.params("app") == {
        "container": "app",
        "follow": "true",
        "timestamps": "true",
        "tailLines": "0",
        "sinceTime": "2026-01-02T03:04:05Z",
        "limitBytes": "100",
    }
    assert LogOptions().params("app") == {"container": "app"}
