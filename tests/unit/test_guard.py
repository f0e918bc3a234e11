"""node/guard.py: the per-host connection limit, the negotiation deadline and the report
throttle, with an injected clock."""

from __future__ import annotations

from node.guard import Connection, ConnectionGuard, Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_host_gets_at_most_its_limit_and_a_released_slot_is_free_again() -> None:
    guard = ConnectionGuard(2, 5.0)
    assert guard.admit("10.0.0.9") is None and guard.admit("10.0.0.9") is None
    refused = guard.admit("10.0.0.9")
    assert refused == "2 connections from 10.0.0.9 already open (node.max_connections_per_host)"
    assert guard.admit("10.0.0.8") is None  # another host is counted apart
    guard.release(None, "10.0.0.9")
    assert guard.open_from("10.0.0.9") == 1
    assert guard.admit("10.0.0.9") is None


def test_an_allowed_aes_host_keeps_its_capacity() -> None:
    allowed = {"10.0.0.5"}
    guard = ConnectionGuard(1, 5.0, exempt_hosts=lambda: allowed)
    assert all(guard.admit("10.0.0.5") is None for _ in range(20))
    assert guard.admit("10.0.0.6") is None and guard.admit("10.0.0.6") is not None
    allowed.clear()  # the live config changed: no longer exempt
    assert guard.admit("10.0.0.5") is not None


def test_a_connection_that_does_not_negotiate_in_time_is_late_once() -> None:
    clock = Clock()
    guard = ConnectionGuard(8, 5.0, clock=clock)
    closed: list[str] = []
    done = {"fast": False, "slow": False}
    for name in done:
        guard.admit("h")
        guard.watch(
            hash(name),
            Connection("h", clock(), lambda n=name: closed.append(n), lambda n=name: done[n]),
        )
    clock.now += 4.9
    assert guard.sweep() == []
    done["fast"] = True  # negotiated: never late
    clock.now += 0.2
    late = guard.sweep()
    assert [c.host for c in late] == ["h"]
    late[0].close()
    assert closed == ["slow"]
    assert guard.sweep() == []  # reported once
    guard.release(hash("slow"), "h")
    guard.release(hash("slow"), "h")  # a second release counts nothing
    guard.release(hash("fast"), "h")
    assert guard.open_from("h") == 0


def test_the_throttle_reports_once_a_period_and_counts_the_rest() -> None:
    clock = Clock()
    throttle = Throttle(60.0, clock=clock)
    assert throttle.take("a") == (True, 0)
    assert throttle.take("a") == (False, 0) and throttle.take("a") == (False, 0)
    assert throttle.take("b") == (True, 0)  # its own key
    clock.now += 60
    assert throttle.take("a") == (True, 2)  # the two not reported


def test_the_throttle_stays_bounded_under_many_addresses() -> None:
    throttle = Throttle(60.0, clock=Clock())
    for n in range(10_005):
        throttle.take(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}")
        throttle.take(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}")  # counted as quiet
    assert len(throttle._last) < 10_001 and len(throttle._quiet) < 10_001


def test_hosts_together_get_at_most_the_process_limit_and_an_allowed_host_is_not_counted() -> None:
    allowed = {"10.0.0.5"}
    guard = ConnectionGuard(2, 5.0, exempt_hosts=lambda: allowed, max_total=3)
    for _ in range(4):
        assert guard.admit("10.0.0.5") is None  # exempt: neither refused nor counted
    assert guard.admit("10.0.1.1") is None and guard.admit("10.0.1.2") is None and guard.admit("10.0.1.3") is None
    refused = guard.admit("10.0.1.4")  # a fourth address, under its own per-host limit
    assert refused == "3 connections already open from hosts other than the allowed AEs' (node.max_connections)"
    assert guard.admit("10.0.0.5") is None  # the allowed AE's host still gets in
    guard.release(None, "10.0.1.1")
    assert guard.admit("10.0.1.4") is None  # a freed connection makes room
