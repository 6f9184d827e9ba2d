"""The scheduler is fair across keys and reports honest queue positions."""

from __future__ import annotations

import threading
import time

from nnglass.server.scheduler import WAIT_ROUNDS, Scheduler, Share


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
    s.submit("m", "a", "a1", share=Share("k", 1, 4))
    s.submit("m", "a", "a2", share=Share("other", 1, 4))
    s.submit("m", "b", "b1", share=Share("k", 1, 4))
    s.submit("m", "c", "c1")  # cannot share
    s.submit("m", "b", "b2", share=Share("k", 1, 4))
    first = s.next("m", timeout=0)
    assert first == "a1"
    assert s.take_sharing("m", first, limit=1) == ["b1"]
    assert s.positions("m") == {"c1": 0, "a2": 1, "b2": 2}  # b was served: to the back
    assert s.take_sharing("m", "c1", limit=5) == []


def test_a_shared_pass_stays_within_its_token_budget() -> None:
    s = Scheduler(["m"])
    s.submit("m", "a", "a1", share=Share("k", 1, 10))
    s.submit("m", "b", "b1", share=Share("k", 2, 20))  # 3 rows x 20 = 60: over 50, left
    s.submit("m", "c", "c1", share=Share("k", 1, 12))  # 2 rows x 12 = 24: fits
    s.submit("m", "d", "d1", share=Share("k", 2, 8))  # 4 rows x 12 = 48: fits
    first = s.next("m", timeout=0)
    assert s.take_sharing("m", first, limit=10, tokens=50) == ["c1", "d1"]
    assert s.positions("m") == {"b1": 0}


def test_a_pass_that_is_not_full_waits_its_window_for_more() -> None:
    s = Scheduler(["m"])
    s.submit("m", "a", "a1", share=Share("k", 1, 4))
    first = s.next("m", timeout=0)
    late = threading.Timer(0.05, lambda: s.submit("m", "b", "b1", share=Share("k", 1, 4)))
    late.start()
    assert s.take_sharing("m", first, limit=1, wait=30) == ["b1"]  # returns once it is full
    late.join()
    s.submit("m", "a", "a2", share=Share("k", 1, 4))
    assert s.take_sharing("m", s.next("m", timeout=0), limit=5, wait=0) == []


def test_the_wait_goes_on_while_jobs_keep_arriving_and_is_bounded() -> None:
    s = Scheduler(["m"])
    s.submit("m", "a", "first", share=Share("k", 1, 4))
    first = s.next("m", timeout=0)
    stop = threading.Event()

    def trickle() -> None:  # one job every 10 ms, for longer than the bound
        for i in range(200):
            if stop.wait(0.01):
                return
            s.submit("m", f"k{i}", f"j{i}", share=Share("k", 1, 4))

    t = threading.Thread(target=trickle)
    t.start()
    began = time.monotonic()
    taken = s.take_sharing("m", first, limit=1000, wait=0.1)  # each gap (10 ms) < the window
    waited = time.monotonic() - began
    stop.set()
    t.join()
    assert len(taken) >= 2  # it kept waiting past the first window
    assert waited < 0.1 * WAIT_ROUNDS + 1.0  # and not forever
    assert taken == [f"j{i}" for i in range(len(taken))]
