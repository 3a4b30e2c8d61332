"""Pure pieces of the agent runtime: config precedence, backoff, the event log."""

from __future__ import annotations

import random

import pytest

from agent import protocol as p
from agent.runtime.backoff import Backoff
from agent.runtime.config import ConfigError, build, parse_cmdline
from agent.runtime.eventlog import EventLog


def test_config_precedence_flags_over_env_over_cmdline() -> None:
    cmdline = (
        "BOOT_IMAGE=/vmlinuz console=ttyS0 sledge.controller=http://10.0.2.100:8080 "
        "sledge.token=abc sledge.poll-wait=5"
    )
    config = build(cmdline, {"SLEDGE_TOKEN": "from-env"}, {"token": None, "workers": 2})
    assert config.controller == "http://10.0.2.100:8080"
    assert config.token == "from-env"
    assert config.poll_wait == 5.0 and config.workers == 2
    assert build(cmdline, {}, {"controller": "https://c:1"}).controller == "https://c:1"


def test_config_errors_name_the_setting() -> None:
    with pytest.raises(ConfigError, match="controller 'ftp://x'"):
        build("sledge.controller=ftp://x")
    with pytest.raises(ConfigError, match="heartbeat: expected a float"):
        parse_cmdline("sledge.heartbeat=soon")
    with pytest.raises(ConfigError, match=r"ca '/nonexistent\.pem'"):
        build("sledge.ca=/nonexistent.pem")
    assert parse_cmdline("sledge.shell sledge.power=1 sledge.unknown=3") == {"shell": True, "power": True}


def test_full_jitter_backoff_spreads_within_a_growing_capped_window() -> None:
    b = Backoff(base=1.0, cap=8.0, rng=random.Random(1))
    ceilings = [1, 2, 4, 8, 8, 8]
    for ceiling in ceilings:
        assert 0 <= b.next_delay() <= ceiling
    samples = [Backoff(base=1.0, cap=60.0, attempt=10, rng=random.Random(i)).next_delay() for i in range(200)]
    assert max(samples) > 45 and min(samples) < 15  # spread over the whole window, not clustered
    b.reset()
    assert b.next_delay() <= 1.0


def test_event_log_numbers_on_send_and_resends_until_acknowledged() -> None:
    log = EventLog("j-000000000001", 1, next_seq=5)
    log.add(p.EventKind.STAGE, "a")
    log.add(p.EventKind.LOG, "b")
    first = log.batch()
    assert first is not None and [e.seq for e in first.events] == [5, 6]
    log.add(p.EventKind.LOG, "c")
    again = log.batch()  # not acknowledged: the same batch, same numbers
    assert again == first
    log.acknowledge(p.EventAck(7))
    nxt = log.batch()
    assert nxt is not None and [(e.seq, e.message) for e in nxt.events] == [(7, "c")]
    log.acknowledge(p.EventAck(8))
    assert log.batch() is None and log.empty()


def test_event_log_is_bounded_and_drops_progress_first() -> None:
    log = EventLog("j-000000000001", 1, next_seq=1, limit=3)
    log.add(p.EventKind.PROGRESS, "10%", 1, 10)
    log.add(p.EventKind.PROGRESS, "20%", 2, 10)  # supersedes 10%
    log.add(p.EventKind.STAGE, "writing")
    log.add(p.EventKind.PROGRESS, "30%", 3, 10)
    log.add(p.EventKind.ERROR, "boom")  # over the limit: the oldest progress goes
    batch = log.batch()
    assert batch is not None
    assert [e.message for e in batch.events] == ["writing", "30%", "boom"]
    assert [e.seq for e in batch.events] == [1, 2, 3]
    assert log.dropped == 1
