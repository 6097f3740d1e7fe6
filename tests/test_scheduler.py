"""Fair download slots between API keys: the plan on its own, then end to end through `casimg serve`
with one key flooding slow-origin URLs while another key sends one URL."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from casimg.keys import Scope
from casimg.scheduler import FairSlots, OriginCaps
from tests.origin import Origin
from tests.procs import Processes, casimg, submit


def test_a_lone_key_gets_every_slot_but_the_reserve():
    slots = FairSlots(64)
    assert slots.reserve == 8
    assert slots.plan(["a"]) == {"a": 1}  # a newcomer: one entry, to find out whether it has any
    assert slots.try_take("a")
    assert slots.plan(["a"]) == {"a": 63 - 8}
    for _ in range(55):
        assert slots.try_take("a")
    assert not slots.may_take("a") and slots.free == 8
    assert slots.plan(["a"]) == {}


def test_a_newcomer_takes_a_reserved_slot_and_freed_slots_go_to_whoever_holds_fewest():
    slots = FairSlots(16, reserve=2)
    for _ in range(14):
        assert slots.try_take("flood")
    assert slots.plan(["flood", "new"]) == {"new": 1}
    assert slots.try_take("new") and slots.try_take("other")  # two newcomers fill the reserve
    assert slots.free == 0 and not slots.may_take("third")
    for _ in range(4):
        slots.give_back("flood")
    # 4 free, 2 past the reserve: both to "new" and "other" (1 held each) before "flood" (10 held).
    assert slots.plan(["flood", "new", "other"]) == {"new": 1, "other": 1}


def test_entries_waiting_for_a_slot_count_against_their_key():
    slots = FairSlots(8, reserve=0)
    slots.queue_up("a")
    # "a" is not a newcomer, and its waiting entry will take one of the 8 free slots: 7 are left to plan.
    assert slots.plan(["a", "b"]) == {"a": 7, "b": 1}
    slots.leave_queue("a")
    assert slots.waiting == {}


def test_entries_away_for_their_origin_hold_back_their_own_key_alone_up_to_the_bound():
    async def scenario() -> None:
        slots = FairSlots(8, reserve=0, ahead=0, away_per_key=2, away_bound=3)
        assert slots.try_take("flood")  # downloading from the slow origin
        assert slots.step_away("flood")  # waiting for that origin, its slot given back
        # Not held back, but read no further than its bound: 1 more, though 7 slots are free.
        assert not slots.held_back("flood") and slots.plan(["flood"]) == {"flood": 1}
        assert slots.step_away("flood")
        assert slots.held_back("flood") and (slots.readable, slots.load("flood")) == (7, 1)
        # The free slots go to the others; none of them to the key held back.
        assert slots.plan(["flood", "other"]) == {"other": 1}
        assert slots.try_take("other") and slots.step_away("other")  # one of its own is away: not held back
        assert not slots.held_back("other") and slots.plan(["flood", "other"]) == {"other": 1}
        assert not slots.step_away("flood")  # past the bound in all: an entry waiting for a slot
        assert (slots.readable, dict(slots.waiting), slots.away.total()) == (5, {"flood": 1}, 3)
        slots.leave_queue("flood")
        woken = asyncio.ensure_future(slots.changed(5))
        await asyncio.sleep(0)
        slots.come_back("other")
        assert not woken.done()
        slots.come_back("flood")  # under its bound again: its queue may be read, and a waiting reader is told
        await asyncio.wait_for(woken, 1)
        assert not slots.held_back("flood") and slots.plan(["flood", "other"]) == {"flood": 1, "other": 5}
        slots.come_back("flood")
        assert slots.away == {}

    asyncio.run(scenario())


def test_a_busy_key_is_read_however_many_idle_keys_there_are():
    slots = FairSlots(64)
    assert slots.try_take("busy")
    idle = [f"idle{n}" for n in range(200)]
    wanted = slots.plan(["busy", *idle])
    assert wanted["busy"] == 63 - 8 and all(wanted[name] == 1 for name in idle)


def test_entries_read_ahead_wait_for_slots_and_leave_the_reserve_to_newcomers():
    slots = FairSlots(8, reserve=2, ahead=8)
    assert slots.try_take("a")
    assert slots.readable == 15
    assert slots.plan(["a"]) == {"a": 15 - 2}  # every free slot but the reserve, and eight more to wait
    for _ in range(5):
        assert slots.try_take("a")
    for _ in range(8):
        slots.queue_up("a")  # read ahead: they wait for a slot
    assert slots.readable == 2 and slots.free == 2
    assert slots.plan(["a"]) == {}  # no more for "a": what is left is the reserve
    assert not slots.may_take("a")  # nor may its waiting entries take the reserve
    assert slots.plan(["a", "new"]) == {"new": 1} and slots.try_take("new")


def test_a_given_back_slot_wakes_only_the_waiting_entries_that_may_take_it():
    async def scenario() -> None:
        slots = FairSlots(4, reserve=1, ahead=8)
        for _ in range(3):
            assert slots.try_take("busy")
        assert slots.try_take("other")
        busy = [asyncio.ensure_future(slots.take("busy")) for _ in range(5)]
        newcomer = asyncio.ensure_future(slots.take("new"))
        await asyncio.sleep(0)
        slots.give_back("other")  # one free slot, the reserve: only the newcomer may take it
        await asyncio.sleep(0)
        assert newcomer.done() and slots.held["new"] == 1
        assert not any(task.done() for task in busy)
        slots.give_back("new")
        slots.give_back("busy")  # two free: one past the reserve, for the first busy entry only
        await asyncio.sleep(0)
        assert [task.done() for task in busy] == [True, False, False, False, False]
        assert slots.free == 1 and len(slots._takers["busy"]) == 4  # the other four were not woken at all
        # A woken entry cancelled before it runs passes its wake on to the next.
        slots.give_back("busy")
        busy[1].cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert busy[1].cancelled() and busy[2].done() and slots.free == 1
        for task in busy[3:]:
            task.cancel()
        await asyncio.gather(*busy[3:], return_exceptions=True)
        assert not slots._takers

    asyncio.run(scenario())


def test_an_entry_that_holds_its_origins_turn_goes_ahead_of_its_own_keys_waiting_entries_only():
    """worker._Lent: an entry that lent its slot while it waited for a turn, and has it, asks `first`: it
    gets its key's next slot before the key's entries read ahead, but takes none from a key holding fewer."""
    async def scenario() -> None:
        slots = FairSlots(4, reserve=0)
        for owner in ("a", "a", "a", "b"):
            assert slots.try_take(owner)
        read_ahead = asyncio.ensure_future(slots.take("a"))
        other = asyncio.ensure_future(slots.take("b"))
        await asyncio.sleep(0)
        turn_holder = asyncio.ensure_future(slots.take("a", first=True))
        await asyncio.sleep(0)
        slots.give_back("a")  # a holds 2, b 1: b's entry first
        await asyncio.sleep(0)
        assert other.done() and not turn_holder.done() and not read_ahead.done()
        slots.give_back("b")  # a 2, b 1 again: b has no entry waiting, so a's turn holder, before a's read-ahead
        await asyncio.sleep(0)
        assert turn_holder.done() and not read_ahead.done()
        read_ahead.cancel()
        await asyncio.gather(read_ahead, return_exceptions=True)
        assert not slots._takers

    asyncio.run(scenario())


def test_a_waiter_cancelled_before_it_runs_is_passed_over_by_a_give_back():
    """A stop cancels every task in one go: a slot holder's give-back then meets waiters whose futures are
    cancelled and whose tasks have not run yet. They are passed over, and leave without an error."""
    async def scenario() -> None:
        for first in (False, True):
            slots = FairSlots(1, reserve=0)
            assert slots.try_take("a")

            async def holder(slots: FairSlots) -> None:
                try:
                    await asyncio.sleep(10)
                finally:
                    slots.give_back("a")

            held = asyncio.ensure_future(holder(slots))
            waiting = asyncio.ensure_future(slots.take("b", first=first))
            await asyncio.sleep(0)
            held.cancel()
            waiting.cancel()
            results = await asyncio.gather(held, waiting, return_exceptions=True)
            assert all(isinstance(result, asyncio.CancelledError) for result in results), results
            assert not slots._takers and not slots._woken and slots.free == 1
            assert slots.try_take("c")  # and give-backs go on working

    asyncio.run(scenario())


def test_a_given_back_slot_goes_to_the_waiting_entry_of_the_key_holding_fewest():
    """A busy key's entries read ahead came first; a newcomer's later entries still get the next slots,
    as the reader's plan would share them, instead of waiting behind all of the busy key's."""
    async def scenario() -> None:
        slots = FairSlots(10, reserve=2, ahead=10)
        for _ in range(7):
            assert slots.try_take("busy")
        assert slots.try_take("new")  # its first entry, in the reserve
        busy = [asyncio.ensure_future(slots.take("busy")) for _ in range(8)]
        await asyncio.sleep(0)
        new = [asyncio.ensure_future(slots.take("new")) for _ in range(4)]
        await asyncio.sleep(0)
        for _ in range(3):
            slots.give_back("busy")  # 5 free, 3 past the reserve
        await asyncio.sleep(0)
        # "new" holds 1 against "busy"'s 4: the three slots go to its entries, though they came later.
        assert [task.done() for task in new] == [True, True, True, False]
        assert not any(task.done() for task in busy)
        assert slots.held == {"busy": 4, "new": 4} and slots.free == 2
        slots.give_back("new")
        slots.give_back("new")  # 4 free, 2 past the reserve: one to "new" (2 held), then one to "busy"
        await asyncio.sleep(0)
        assert [task.done() for task in busy] == [True] + [False] * 7 and new[3].done()
        for task in busy + new:
            task.cancel()
        await asyncio.gather(*busy, *new, return_exceptions=True)

    asyncio.run(scenario())


# -- end to end -----------------------------------------------------------------------------------

FLOOD_PORTS = 8  # the flood's URLs are spread over 8 ports of one address, as the attack was
FLOOD_URLS = 128  # two jobs of 64 URLs that trickle a byte every 5 s
FETCH_TIMEOUT = 20  # seconds; the flood would hold slots for minutes (128 URLs, 8 at a time per address)
FAIR_BOUND = 15.0  # seconds the other key's URL may take; measured about 1-2 s
MEASURE_LIMIT = 300.0  # seconds the test keeps waiting, so a regression reports its real delay


@pytest.fixture
def flood_origins() -> Iterator[list[Origin]]:
    origins = [Origin() for _ in range(FLOOD_PORTS)]
    for origin in origins:
        origin.__enter__()
    yield origins
    for origin in origins:
        origin.__exit__()


@pytest.fixture
def bystander() -> Iterator[Origin]:
    """The other key's origin, on an address of its own (127.0.0.3)."""
    with Origin("127.0.0.3") as server:
        yield server


def test_origin_caps_give_back_every_place_when_a_waiting_holder_is_cancelled():
    """A download cancelled while it waits for an address's place holds none afterwards, and the domain
    place it had taken first is given back."""

    async def scenario() -> None:
        caps = OriginCaps(per_address=1, per_domain=4)
        async with caps.hold("a.example.com", "192.0.2.1"):
            waiting = asyncio.ensure_future(caps.hold("b.example.com", "192.0.2.1").__aenter__())
            await asyncio.sleep(0.01)
            assert caps.domains.in_use("example.com") == 2  # the second one waits for the address alone
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert caps.domains.in_use("example.com") == 1
            assert caps.addresses.in_use("192.0.2.1") == 1
        assert caps.domains.in_use("example.com") == caps.addresses.in_use("192.0.2.1") == 0
        assert not caps.domains._gates and not caps.addresses._gates  # no semaphore outlives its users
        async with caps.hold("example.com", "192.0.2.1"):  # and the place can be taken again
            assert caps.addresses.in_use("192.0.2.1") == 1

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_slow_origin_flood_from_one_key_does_not_delay_another_keys_url(
    tmp_path: Path, procs: Processes, flood_origins: list[Origin], bystander: Origin
):
    data_dir = tmp_path / "data"
    server = procs.server(data_dir, env={
        "CASIMG_ALLOW_NETWORKS": "127.0.0.1/32,127.0.0.3/32", "CASIMG_RATE_LIMIT": "0",
        "CASIMG_FETCH_TIMEOUT": str(FETCH_TIMEOUT),
    })
    other_key = casimg("keys", "create", "--name", "other", "--scope", "write",
                       "--data-dir", str(data_dir)).stdout.strip().splitlines()[-1]
    flood = [flood_origins[n % FLOOD_PORTS].url(f"/trickle/{n}?seconds=5") for n in range(FLOOD_URLS)]
    for start in range(0, FLOOD_URLS, 64):
        submit(server, flood[start:start + 64])
    deadline = time.monotonic() + 60
    while sum(o.hits[p] for o in flood_origins for p in o.hits if p.startswith("/trickle/")) < 8:
        assert time.monotonic() < deadline, "the flood never started"
        time.sleep(0.05)

    started = time.monotonic()
    status, body, _ = server.call("POST", "/api/images", {"image_urls": [bystander.url("/img/915000.jpg")]},
                                  key=other_key)
    assert status == 202, body
    job_path = f"/api/jobs/{json.loads(body)['job_id']}"
    while time.monotonic() - started < MEASURE_LIMIT:
        job = json.loads(server.call("GET", job_path, key=other_key)[1])
        if job["status"] == "done":
            break
        time.sleep(0.05)
    delay = time.monotonic() - started
    flooding = sum(o.hits[p] for o in flood_origins for p in o.hits if p.startswith("/trickle/"))
    print(f"\nthe other key's URL finished in {delay:.2f} s under a flood of {FLOOD_URLS} trickling URLs "
          f"({flooding} of them started)")
    assert job["status"] == "done" and job["stored"] == 1, json.dumps(job)
    assert delay < FAIR_BOUND


JUNK = 5000  # URLs refused before any connection: each costs the worker a moment, not a download


@pytest.mark.gen_test(timeout=120)
async def test_one_keys_backlog_is_not_in_front_of_another_keys_url(api, services, origin):
    """A backlog of junk from one key and one URL from another: the other URL does not wait its turn
    behind the backlog (it used to: one FIFO stream for every key)."""
    other = await services.api_keys.create("other", Scope.write)
    junk = [f"http://127.0.0.2:9/junk/{n}" for n in range(JUNK)]
    backlog = await api("POST", "/api/images", json_body={"image_urls": junk})
    assert backlog.code == 202
    backlog_path = backlog.headers["Location"]
    started = time.monotonic()
    url = origin.url("/img/915001.jpg")
    served = await api("POST", "/api/images?wait=60", key=other, json_body={"image_urls": [url]})
    delay = time.monotonic() - started
    assert served.code == 200 and json.loads(served.body)["stored"] == 1
    left = json.loads((await api("GET", backlog_path)).body)
    print(f"\nthe other key's URL took {delay:.2f} s; {left['done']} of the {JUNK} junk URLs were done by then")
    assert left["status"] != "done", "the backlog finished first: the test shows nothing"
    assert left["done"] < JUNK * 0.9
