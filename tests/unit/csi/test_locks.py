"""Keyed locks: serialize per key, ABORTED after the wait, no deadlock, no growth."""

from __future__ import annotations

import threading

import pytest

from csi_driver.locks import KeyedLocks
from plugin_runtime.errors import Aborted


def test_same_key_waits_then_aborts():
    locks = KeyedLocks(wait=0.05)
    with locks.hold("vol:a"):
        errors = []

        def other():
            try:
                with locks.hold("vol:a"):
                    pass
            except Aborted as exc:
                errors.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join(5)
        assert len(errors) == 1
        assert "vol:a" not in str(errors[0]) and "a" in str(errors[0])
        assert errors[0].code == "ABORTED"
        with locks.hold("vol:b", wait=0):
            pass
    assert len(locks) == 0


def test_waiter_gets_the_lock_when_released():
    locks = KeyedLocks(wait=5)
    order = []
    locks.acquire("k")
    done = threading.Event()

    def waiter():
        with locks.hold("k"):
            order.append("waiter")
        done.set()

    t = threading.Thread(target=waiter)
    t.start()
    order.append("holder")
    locks.release("k")
    assert done.wait(5)
    t.join(5)
    assert order == ["holder", "waiter"]
    assert len(locks) == 0


def test_hold_all_takes_keys_in_one_order():
    locks = KeyedLocks(wait=2)
    counter = {"n": 0}

    def work(keys):
        for _ in range(200):
            with locks.hold_all(*keys):
                counter["n"] += 1

    threads = [threading.Thread(target=work, args=(k,)) for k in
               (("vol:a", "vol:b"), ("vol:b", "vol:a"), ("vol:b", "snap:c", "vol:a"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert counter["n"] == 600
    assert len(locks) == 0


def test_hold_all_releases_what_it_took_when_one_key_aborts():
    locks = KeyedLocks(wait=0.01)
    locks.acquire("vol:b")
    with pytest.raises(Aborted), locks.hold_all("vol:a", "vol:b"):
        pass
    assert not locks.held("vol:a")
    locks.release("vol:b")
    assert len(locks) == 0
