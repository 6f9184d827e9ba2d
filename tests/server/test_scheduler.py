"""The scheduler is fair across keys and reports honest queue positions."""

from __future__ import annotations

import threading

from nnglass.server.scheduler import Scheduler


def test_keys_take_turns_so_a_heavy_user_cannot_starve_others() -> None:
    s = Scheduler(["m"])
    for i in range(5):
        s.submit("m", "heavy", f"h{i}")
    s.submit("m", "light", "l0")
    s.submit("m", "light", "l1")
    order = [s.next("m", timeout=0) for _ in range(7)]
    assert order == ["h0", "l0", "h1", "l1", "h2", "h3", "h4"]


def test_positions_match_the_order_jobs_start() -> None:
    s = Scheduler(["m"])
    for job, key in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("c1", "c"), ("b2", "b")]:
        s.submit("m", key, job)
    positions = s.positions("m")
    started = [s.next("m", timeout=0) for _ in range(5)]
    assert sorted(positions, key=positions.get) == started


def test_cancel_removes_a_queued_job_and_quota_counts_per_key() -> None:
    s = Scheduler(["m", "n"])
    s.submit("m", "a", "j1")
    s.submit("n", "a", "j2")
    s.submit("m", "b", "j3")
    assert s.queued_by("a") == 2
    assert s.cancel("m", "j1")
    assert not s.cancel("m", "j1")
    assert s.queued_by("a") == 1
    assert s.next("m", timeout=0) == "j3"
    assert s.next("m", timeout=0) is None


def test_next_blocks_until_work_arrives_and_close_releases_waiters() -> None:
    s = Scheduler(["m"])
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(s.next("m", timeout=5)))
    t.start()
    s.submit("m", "a", "j")
    t.join(timeout=5)
    assert got == ["j"]
    t = threading.Thread(target=lambda: got.append(s.next("m", timeout=5)))
    t.start()
    s.close()
    t.join(timeout=5)
    assert got == ["j", None]


def test_jobs_that_can_share_a_forward_pass_are_taken_together_in_start_order() -> None:
    s = Scheduler(["m"])
    s.submit("m", "a", "a1", share="k")
    s.submit("m", "a", "a2", share="other")
    s.submit("m", "b", "b1", share="k")
    s.submit("m", "c", "c1")  # cannot share
    s.submit("m", "b", "b2", share="k")
    first = s.next("m", timeout=0)
    assert first == "a1"
    assert s.take_sharing("m", first, limit=1) == ["b1"]
    assert s.positions("m") == {"c1": 0, "a2": 1, "b2": 2}  # b was served: to the back
    assert s.take_sharing("m", "c1", limit=5) == []
