"""API keys and scopes.

A key reads ``casimg_<id>_<secret>``: the id names it in listings and revocations, the secret is
shown once, at creation, and only its SHA-256 is kept in Redis (``KeySpace.api_keys``). Secrets are
random 256-bit values, so a plain hash is enough: there is nothing to brute-force. A bootstrap key
given in the environment may have any form; its id is then derived from its hash.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from enum import IntEnum

import redis.asyncio as aioredis

from casimg.clock import now_iso
from casimg.errors import BadRequest, Forbidden, NotFound, Unauthorized
from casimg.lua import source as lua_source
from casimg.schema import KeySpace

KEY_RE = re.compile(r"^casimg_([0-9a-f]{12})_([A-Za-z0-9_-]{20,})$")
NAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
SECRET_BYTES = 32
ID_HEX = 12


class Scope(IntEnum):
    """Each scope includes the ones below it."""

    read = 1
    write = 2
    admin = 3


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    scope: Scope
    created: str


def split_key(key: str) -> tuple[str, str]:
    """(id, secret) of a presented key; keys of any other form get an id derived from their hash."""
    match = KEY_RE.match(key)
    if match:
        return match.group(1), match.group(2)
    return hashlib.sha256(key.encode()).hexdigest()[:ID_HEX], key


def _secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()




class KeyStore:
    def __init__(self, redis: aioredis.Redis, keys: KeySpace, cache_ttl: float = 0.0) -> None:
        self.redis = redis
        self.keys = keys
        self.cache_ttl = cache_ttl
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._create = redis.register_script(lua_source("create_key"))

    async def create(self, name: str, scope: Scope, key: str | None = None, only_if_empty: bool = False) -> str | None:
        """Register a key and return it (None when only_if_empty and keys exist). The key is not kept."""
        if not NAME_RE.match(name):
            raise BadRequest("key name: 1-64 letters, digits, '.', '_', '@' or '-'")
        if key is None:
            key_id = secrets.token_hex(ID_HEX // 2)
            key = f"casimg_{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
        key_id, secret = split_key(key)
        record = {"name": name, "scope": scope.name, "secret_sha256": _secret_hash(secret), "created": now_iso()}
        created = await self._create(
            keys=[self.keys.api_keys], args=[key_id, json.dumps(record), name, "1" if only_if_empty else "0"]
        )
        if created == -1:
            return None
        if created == 0:
            raise BadRequest(f"a key named {name!r} exists already")
        return key

    async def list(self) -> list[ApiKey]:
        raw = await self.redis.hgetall(self.keys.api_keys)
        return sorted((self._parse(key_id, value) for key_id, value in raw.items()), key=lambda k: k.created)

    async def revoke(self, name_or_id: str) -> ApiKey:
        for key in await self.list():
            if name_or_id in (key.name, key.id):
                await self.redis.hdel(self.keys.api_keys, key.id)
                self._cache.clear()
                return key
        raise NotFound(f"no key named {name_or_id!r}")

    async def authenticate(self, presented: str | None, needed: Scope) -> ApiKey:
        if not presented:
            raise Unauthorized("an API key is required (X-API-Key or Authorization: Token|Bearer)")
        key = await self._lookup(presented)
        if key is None:
            raise Unauthorized("unknown or revoked API key")
        if key.scope < needed:
            raise Forbidden(f"this key has scope {key.scope.name!r}; the operation needs {needed.name!r}")
        return key

    async def _lookup(self, presented: str) -> ApiKey | None:
        now = time.monotonic()
        cached = self._cache.get(presented)
        if cached and cached[0] > now:
            return cached[1]
        key_id, secret = split_key(presented)
        raw = await self.redis.hget(self.keys.api_keys, key_id)
        found = None
        if raw:
            record = json.loads(raw)
            if hmac.compare_digest(record["secret_sha256"], _secret_hash(secret)):
                found = self._parse(key_id, raw)
        if self.cache_ttl > 0:
            if len(self._cache) > 10_000:  # unknown keys must not grow the cache without bound
                self._cache.clear()
            self._cache[presented] = (now + self.cache_ttl, found)
        return found

    @staticmethod
    def _parse(key_id: str, raw: str) -> ApiKey:
        record = json.loads(raw)
        return ApiKey(id=key_id, name=record["name"], scope=Scope[record["scope"]], created=record["created"])
