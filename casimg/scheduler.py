"""Who downloads next: a worker's download slots shared between API keys, and caps per origin.

Three bounds stand between one client's URLs and everyone else's downloads:

- **Per key** (``FairSlots``). Each key's URLs wait in a Redis stream of their own (queue.py), so a
  backlog of one key is never in front of another key's entries. A worker reads from those streams
  only as many entries as it has slots to give, handing each free slot to the key that holds fewest,
  ties taken in turn. The last ``reserve`` free slots go only to keys that hold none: downloads cannot
  be taken away once started, so without a reserve a key whose 64 URLs trickle a byte every few seconds
  would hold every slot until its fetches time out, and a newcomer's first URL would wait for that.
  With the reserve, a key's first URL starts within a look at the queues (under a second), whatever
  the others hold; further slots come back to it as soon as any download ends.
- **Per resolved address** (``OriginCaps``): at most ``per_address`` downloads at once to one IP
  address (IPv6: one /64, which one origin usually holds whole), however many host names or ports lead
  there, so eight ports of one machine count as one origin.
- **Per registrable domain** (``OriginCaps``): at most ``per_domain`` downloads at once to the names
  under one registrable domain (``a.example.co.uk`` and ``b.example.co.uk`` are ``example.co.uk``), from
  the public-suffix list shipped inside the ``publicsuffixlist`` package; nothing is downloaded at run
  time. A name the list does not know counts as its own domain; a numeric host has only its address.

Both caps are per worker process. A slot is given back while a URL waits to be retried (see
worker.py), so a key's backoff never holds anyone's slot; nor while it waits for a place under a cap,
so the URLs of one slow origin do not keep the slots from the key's other origins (``FairSlots.step_away``:
past a bound on a key's entries waiting so, its queue is read no further; worker._Lent). That wait
does not count against the fetch timeout (fetcher.py): a URL queued behind a slow origin's long
downloads waits for its turn, and is not failed as a timeout without a request.

Politeness (politeness.py) adds a third origin bound, keyed by registrable domain (or a numeric host's
address) like ``OriginCaps`` but shared by every process: a request rate per origin (a Redis token
bucket) and cool-downs after 429/503. An entry whose origin is out of tokens or cooling holds no download
slot while it waits: the worker gives its slot back (the entry stays pending under its name, so a crash
loses nothing) and reads on for other keys and origins (past the same bound, for other keys only).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
from collections import Counter, deque
from collections.abc import Sequence
from functools import lru_cache

from publicsuffixlist import PublicSuffixList

# The share of a worker's download slots kept for keys that hold none: 1/8 (8 of the default 64).
# Larger, the ingest of a lone key loses more slots; smaller, fewer newcomers at once start at once.
RESERVE_DIVISOR = 8
IPV6_ORIGIN_PREFIX = 64  # an IPv6 origin is counted by its /64: one site holds a whole /64 as a rule


class FairSlots:
    """`total` download slots; each owner (an API key id, "" for none) takes and gives back its own.

    ``held`` counts the slots each owner holds, ``waiting`` its entries read but waiting for a slot (a
    retry, an entry claimed from a dead worker, or one read ahead). An owner with neither is a newcomer.
    ``away`` counts its entries that gave their slot back to wait for their origin (``step_away``).

    ``ahead`` entries may be read beyond the free slots, to wait for one: a queue read takes as long as
    a download from a fast origin, so a reader that asked only for the slots free when it began left
    most of them idle. An entry read ahead counts against its key like one holding a slot, and takes a
    slot only as the rules allow, so the reserve stays for newcomers; a slot given back goes to the
    waiting entry of the key holding fewest, so a newcomer's next entries do not queue behind a busy
    key's entries read ahead.
    """

    def __init__(self, total: int, reserve: int | None = None, ahead: int = 0, away_per_key: int = 0,
                 away_bound: int = 0) -> None:
        self.total = total
        self.reserve = total // RESERVE_DIVISOR if reserve is None else reserve
        self.ahead = ahead
        self.away_per_key = away_per_key
        self.away_bound = away_bound
        self.held: Counter[str] = Counter()
        self.waiting: Counter[str] = Counter()
        self.away: Counter[str] = Counter()
        self._in_use = 0
        self._turn = 0  # rotates the order in which owners with equal holdings are served
        self._waiters: list[asyncio.Future[None]] = []  # changed(): the reader, woken on every give-back
        # take(): the entries waiting for a slot, per owner in the order they came (with an arrival
        # number), each woken only when a slot it may take is free. Waking every one on each give-back
        # cost 2 µs per waiter, and with the entries read ahead there are up to a slot's worth of them.
        self._takers: dict[str, deque[tuple[int, asyncio.Future[None]]]] = {}
        self._arrivals = itertools.count()
        self._woken: Counter[str] = Counter()  # entries woken for a slot that have not run yet, per owner

    @property
    def free(self) -> int:
        return self.total - self._in_use

    @property
    def readable(self) -> int:
        """Entries the reader may read now: the free slots and the read-ahead, less the entries waiting."""
        return self.free + self.ahead - sum(self.waiting.values())

    def load(self, owner: str) -> int:
        """Slots `owner` holds plus its entries waiting for one: 0 for a newcomer."""
        return self.held[owner] + self.waiting[owner]

    def may_take(self, owner: str) -> bool:
        """A free slot, and either none held by `owner` or more free slots than the reserve. The slots an
        entry was woken for (``_wake_takers``) are not free to anyone else until it has run."""
        free = self.free - self._woken.total()
        return free > 0 and (self.held[owner] == 0 or free > self.reserve)

    def try_take(self, owner: str) -> bool:
        if not self.may_take(owner):
            return False
        self.held[owner] += 1
        self._in_use += 1
        return True

    def queue_up(self, owner: str) -> None:
        """An entry of `owner` now waits for a slot (counted until ``take`` grants it or ``leave_queue``)."""
        self.waiting[owner] += 1

    def leave_queue(self, owner: str) -> None:
        self.waiting[owner] -= 1
        if self.waiting[owner] <= 0:
            del self.waiting[owner]
        self._wake_reader()  # one entry fewer waiting: the reader may read one more

    def step_away(self, owner: str) -> bool:
        """An entry of `owner` that gave its slot back to wait for its origin (its rate, its cool-down, a
        turn under the caps): it takes nothing from the other keys, and ``plan`` reads no more of
        `owner`'s queue while it has ``away_per_key`` entries away, as more of it would most likely wait
        for the same origin. Past ``away_bound`` entries away in all, it counts as an entry waiting for
        a slot instead (``queue_up``), which leaves less for the reader to read for every key: the bound
        on the entries a worker holds. True if away."""
        if self.away.total() >= self.away_bound:
            self.queue_up(owner)
            return False
        self.away[owner] += 1
        return True

    def come_back(self, owner: str) -> None:
        """An entry of `owner` back from away. A reader waiting for a slot is woken when `owner` drops
        below its bound; one blocked on the queues sees it when its block ends."""
        self.away[owner] -= 1
        if self.away[owner] <= 0:
            del self.away[owner]
        if self.away[owner] == self.away_per_key - 1:
            self._wake_reader()  # its queue may be read again

    def held_back(self, owner: str) -> bool:
        """Whether `owner`'s queue is left unread for its entries away (``step_away``)."""
        away = self.away[owner]
        return away > 0 and away >= self.away_per_key

    def _wake_reader(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def take(self, owner: str, first: bool = False) -> None:
        """A slot for a queued-up entry of `owner`, once the rules allow it. An entry that asks `first`
        goes ahead of `owner`'s other waiting entries (one that holds its origin's turn, worker.py);
        between owners, the slots are shared as always."""
        while not self.try_take(owner):
            waiter = asyncio.get_running_loop().create_future()
            place = (next(self._arrivals), waiter)
            queue = self._takers.setdefault(owner, deque())
            if first:
                queue.appendleft(place)
            else:
                queue.append(place)
            try:
                await waiter
            except BaseException:  # cancelled
                if waiter.done() and not waiter.cancelled():
                    self._unwake(owner)
                    self._wake_takers()  # woken for a slot it will not take: the next may take it
                else:
                    # Its place may be gone already: a give-back that came between the cancel and this
                    # step passed over its cancelled waiter (_wake_takers).
                    queue = self._takers.get(owner, deque())
                    with contextlib.suppress(ValueError):
                        queue.remove(place)
                    if not queue:
                        self._takers.pop(owner, None)
                raise
            self._unwake(owner)

    def _unwake(self, owner: str) -> None:
        self._woken[owner] -= 1
        if self._woken[owner] <= 0:
            del self._woken[owner]

    def give_back(self, owner: str) -> None:
        self.held[owner] -= 1
        if self.held[owner] <= 0:
            del self.held[owner]
        self._in_use -= 1
        self._wake_reader()
        self._wake_takers()

    def _wake_takers(self) -> None:
        """Wake as many waiting entries as the free slots can serve under the rules: each free slot to
        the first-come entry of the owner holding fewest, as ``plan`` shares them. An owner that may not
        take the free slots (the reserve) is passed over.

        A woken entry takes its slot when it runs; should another take it first, the entry waits again,
        and the next give-back wakes it.
        """
        free = self.free - self._woken.total()
        while free > 0:
            chosen: tuple[tuple[int, int], str] | None = None
            for owner, queue in self._takers.items():
                held = self.held[owner] + self._woken[owner]
                if held and free <= self.reserve:
                    continue
                rank = (held, queue[0][0])
                if chosen is None or rank < chosen[0]:
                    chosen = (rank, owner)
            if chosen is None:
                break
            owner = chosen[1]
            queue = self._takers[owner]
            waiter = queue.popleft()[1]
            if not queue:
                del self._takers[owner]
            if waiter.done():  # cancelled, and its task has not run since: passed over
                continue
            waiter.set_result(None)
            self._woken[owner] += 1
            free -= 1

    async def changed(self, within: float | None = None) -> None:
        """Return once a slot is given back, or after `within` seconds.

        After a slot comes back, the callbacks already due in this turn of the event loop run first: the
        downloads ending together give their slots back together, and the reader plans once for all.
        """
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        await asyncio.sleep(0)

    def plan(self, owners: Sequence[str]) -> dict[str, int]:
        """How many entries to read now from each owner's queue.

        Each newcomer is asked for one entry, which the reserve is there to start. The free slots past
        the reserve, plus the read-ahead, less the entries already waiting, go one by one to the other
        owners, to the one holding fewest, ties in turn. Newcomers' entries are asked for on top: most of
        their queues are empty, and counting them against the others would leave a busy key unread behind
        many idle ones. An owner ``held_back`` is asked for none, and one with entries away for no more
        than would take it to its bound: those entries most likely wait for the same origin.
        """
        if not owners:
            return {}
        self._turn = (self._turn + 1) % len(owners)
        order = list(owners[self._turn:]) + list(owners[:self._turn])
        load = {owner: self.load(owner) for owner in order}
        order = [owner for owner in order if not self.held_back(owner)]
        wanted: Counter[str] = Counter({owner: 1 for owner in order if load[owner] == 0})
        busy = [owner for owner in order if load[owner] > 0]
        room = {owner: self.away_per_key - self.away[owner] for owner in busy if self.away[owner]}
        spare = self.readable - self.reserve
        while busy and spare > 0:
            owner = min(busy, key=load.__getitem__)  # the first of the fewest, in this turn's order
            wanted[owner] += 1
            load[owner] += 1
            spare -= 1
            if owner in room:
                room[owner] -= 1
                if room[owner] <= 0:
                    busy.remove(owner)
        return dict(wanted)


class _Limit:
    """At most `limit` holders at once per name; a name's semaphore lives only while it is in use."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._gates: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}  # holding or waiting
        self._holding: Counter[str] = Counter()

    def hold(self, name: str) -> OriginTurn:
        """``async with limit.hold(name)``: a place under `name`'s bound for the block's duration."""
        return OriginTurn((self,), (name,))

    async def acquire(self, name: str) -> None:
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = asyncio.Semaphore(self.limit)
        self._users[name] = self._users.get(name, 0) + 1
        try:
            await gate.acquire()
        except BaseException:
            self._leave(name)
            raise
        self._holding[name] += 1

    def release(self, name: str) -> None:
        self._holding[name] -= 1
        self._gates[name].release()
        self._leave(name)

    def _leave(self, name: str) -> None:
        users = self._users[name] - 1
        if users:
            self._users[name] = users
        else:
            del self._users[name], self._gates[name], self._holding[name]

    def in_use(self, name: str) -> int:
        return self._holding[name]

    def full(self, name: str) -> bool:
        """Whether a place under `name` must be waited for now."""
        gate = self._gates.get(name)
        return gate is not None and gate.locked()


class OriginTurn:
    """One request's turn at an origin: a place under each of its bounds (OriginCaps), taken in order
    (``take``, or entering ``async with``) and given back in reverse (``release``, or leaving it).

    A plain class, not a generator-based context manager: it is entered around every request of every
    download, where contextlib's generator machinery cost about 2% of the ingest's event loop (py-spy).
    """

    __slots__ = ("_limits", "_names")

    def __init__(self, limits: tuple[_Limit, ...], names: tuple[str, ...]) -> None:
        self._limits = limits
        self._names = names

    def would_wait(self) -> bool:
        """Whether taking the places now would wait for one."""
        return any(map(_Limit.full, self._limits, self._names))

    async def take(self) -> None:
        taken = 0
        try:
            for limit, name in zip(self._limits, self._names, strict=True):
                await limit.acquire(name)
                taken += 1
        except BaseException:
            for limit, name in reversed(list(zip(self._limits[:taken], self._names[:taken], strict=True))):
                limit.release(name)
            raise

    def release(self) -> None:
        for limit, name in zip(reversed(self._limits), reversed(self._names), strict=True):
            limit.release(name)

    async def __aenter__(self) -> None:
        await self.take()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class OriginCaps:
    """Downloads in flight per resolved address and per registrable domain, in one process."""

    def __init__(self, per_address: int, per_domain: int) -> None:
        self.addresses = _Limit(per_address)
        self.domains = _Limit(per_domain)

    def hold(self, host: str, address: str) -> OriginTurn:
        """Held around one request to `host` (as written in the URL), connected at `address`
        (``async with``, or ``take`` and ``release``).

        The domain first, then the address, always in that order, so two downloads never wait on
        each other's bound.
        """
        domain = registrable_domain(host)
        if domain is None:
            return OriginTurn((self.addresses,), (origin_address(address),))
        return OriginTurn((self.domains, self.addresses), (domain, origin_address(address)))


@lru_cache(maxsize=4096)
def origin_address(address: str) -> str:
    """The name an address is counted under: itself, an IPv4 inside IPv6 as IPv4, IPv6 by its /64.

    Remembered, as registrable_domain is: every download asks it twice (its pace, its cap)."""
    try:
        parsed = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{parsed}/{IPV6_ORIGIN_PREFIX}", strict=False))
    return str(parsed)


@lru_cache(maxsize=1)
def _suffixes() -> PublicSuffixList:
    return PublicSuffixList()  # the list file inside the package: no network, read once


@lru_cache(maxsize=4096)
def registrable_domain(host: str) -> str | None:
    """The registrable domain of a host name (eTLD+1); the name itself if the list does not make one;
    None for a numeric host, which is counted by its address alone."""
    name = host.strip("[]").rstrip(".").lower()
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
        return None
    except ValueError:
        pass
    try:
        domain = _suffixes().privatesuffix(name)
    except (ValueError, UnicodeError):
        domain = None
    return domain or name
