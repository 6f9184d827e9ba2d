"""A frontend remembers the keys it verified (auth.VerifiedKeys, pg_stores.PgKeyStore) and
forgets them at every revoke's NOTIFY, whichever process revoked: two frontends' key
stores (each its own pool and listener, as two `nnglass serve`) on the session's
PostgreSQL, and a third store without a listener (the CLI's, `nnglass keys revoke`).
The remembering is made to last an hour here, so only the NOTIFY can end it; the time
bound itself (KEY_CACHE_S) is checked with a short one."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from nnglass.server.auth import VerifiedKeys
from nnglass.server.pg import Database
from nnglass.server.pg_events import Listener
from nnglass.server.pg_stores import PgKeyStore

HOUR = 3600.0


class Frontend:
    """One frontend's key store: its own pool and listener."""

    def __init__(self, url: str) -> None:
        self.db = Database(url, max_size=2)
        self.listener = Listener(self.db)
        self.keys = PgKeyStore(self.db, self.listener)
        self.listener.start()
        assert self.listener.live
        assert self.keys._verified is not None
        self.keys._verified.ttl = HOUR

    def close(self) -> None:
        self.listener.close()
        self.db.close()


@pytest.fixture
def frontends(pg_clean: Database) -> Iterator[tuple[Frontend, Frontend, PgKeyStore]]:
    a, b = Frontend(pg_clean.url), Frontend(pg_clean.url)
    yield a, b, PgKeyStore(pg_clean)  # the CLI's: no listener, nothing remembered
    a.close()
    b.close()


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """`check()` turned true within `timeout` s (a NOTIFY's trip, not a measure)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def revoke_behind_its_back(db: Database, key_id: str) -> None:
    """A revoke without the NOTIFY (raw SQL): what only the time bound can catch."""
    with db.tx() as conn:
        conn.execute("UPDATE api_keys SET revoked = 1 WHERE id = %s", (key_id,))


def test_a_revoke_anywhere_reaches_every_frontend(frontends: tuple[Frontend, Frontend, PgKeyStore]) -> None:
    a, b, cli = frontends
    alice_id, alice = a.keys.create("alice")
    bob_id, bob = cli.create("bob")
    for store in (a.keys, b.keys):  # each frontend checks, and remembers, both
        assert store.verify(alice) == alice_id and store.verify(bob) == bob_id
    assert cli.revoke("alice")  # from the CLI: a process with no cache of its own
    assert eventually(lambda: a.keys.verify(alice) is None and b.keys.verify(alice) is None)
    assert a.keys.verify(bob) == bob_id and b.keys.verify(bob) == bob_id  # still live
    assert b.keys.revoke(bob_id)  # from a frontend: the other one forgets too
    assert b.keys.verify(bob) is None  # its own at once, not when its NOTIFY comes back
    assert eventually(lambda: a.keys.verify(bob) is None)


def test_a_remembered_key_is_looked_up_again_within_the_bound(
        frontends: tuple[Frontend, Frontend, PgKeyStore], pg_clean: Database) -> None:
    a, b, _ = frontends
    key_id, key = a.keys.create("carol")
    assert a.keys.verify(key) == key_id and b.keys.verify(key) == key_id
    revoke_behind_its_back(pg_clean, key_id)
    assert a.keys.verify(key) == key_id  # remembered: no lookup saw the raw UPDATE
    assert b.keys._verified is not None
    b.keys._verified.ttl = 0.2
    time.sleep(0.3)  # past b's bound: looked up again (a's is an hour)
    assert b.keys.verify(key) is None
    assert a.keys.verify(key) == key_id


def test_nothing_is_remembered_while_the_listener_is_down(
        frontends: tuple[Frontend, Frontend, PgKeyStore], pg_clean: Database) -> None:
    a, _, _ = frontends
    key_id, key = a.keys.create("dave")
    assert a.keys.verify(key) == key_id
    a.listener.close()  # no word of revokes now: every check is a lookup
    revoke_behind_its_back(pg_clean, key_id)
    assert a.keys.verify(key) is None


def test_a_lookup_that_a_revoke_overtook_is_not_remembered() -> None:
    verified = VerifiedKeys(live=lambda: True, ttl=HOUR)
    mark = verified.mark()  # a lookup begins, and reads the key as live...
    verified.forget()  # ...while a revoke's NOTIFY arrives
    verified.put("digest", "key_1", mark)
    assert verified.get("digest") is None
    verified.put("digest", "key_1", verified.mark())
    assert verified.get("digest") == "key_1"
    down = VerifiedKeys(live=lambda: False, ttl=HOUR)
    down.put("digest", "key_1", down.mark())
    assert down.get("digest") is None
