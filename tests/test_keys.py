"""API keys: only a hash is stored; scopes; revocation; bootstrap."""

from __future__ import annotations

import json
import os
import stat

import pytest

from casimg.errors import BadRequest, Forbidden, NotFound, Unauthorized
from casimg.keys import KEY_RE, KeyStore, Scope, split_key
from casimg.schema import KeySpace
from casimg.services import bootstrap_admin_key, connect_redis
from tests.conftest import make_settings


@pytest.fixture
def store(io_loop, redis_server, request):
    client = connect_redis(redis_server.url, 4)
    yield KeyStore(client, KeySpace(f"keys-{request.node.name}-{os.urandom(4).hex()}:"))
    io_loop.run_sync(client.aclose)


@pytest.mark.gen_test
async def test_created_key_has_id_and_secret_and_only_its_hash_is_stored(store):
    key = await store.create("ci", Scope.write)
    assert KEY_RE.match(key)
    key_id, secret = split_key(key)
    raw = await store.redis.hget(store.keys.api_keys, key_id)
    assert secret not in raw and key not in raw
    assert json.loads(raw)["scope"] == "write"
    assert (await store.authenticate(key, Scope.read)).name == "ci"


@pytest.mark.gen_test
async def test_scope_order_and_errors(store):
    key = await store.create("reader", Scope.read)
    with pytest.raises(Forbidden):
        await store.authenticate(key, Scope.write)
    with pytest.raises(Unauthorized):
        await store.authenticate(None, Scope.read)
    with pytest.raises(Unauthorized):
        await store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B"), Scope.read)


@pytest.mark.gen_test
async def test_names_are_unique_and_revoke_by_name_or_id(store):
    first = await store.create("one", Scope.read)
    with pytest.raises(BadRequest):
        await store.create("one", Scope.admin)
    with pytest.raises(BadRequest):
        await store.create("bad name!", Scope.read)
    await store.create("two", Scope.admin)
    assert [k.name for k in await store.list()] == ["one", "two"]
    await store.revoke(split_key(first)[0])
    with pytest.raises(Unauthorized):
        await store.authenticate(first, Scope.read)
    await store.revoke("two")
    with pytest.raises(NotFound):
        await store.revoke("two")
    assert await store.list() == []


@pytest.mark.gen_test
async def test_keys_of_any_form_work_as_bootstrap_keys(store):
    assert await store.create("admin", Scope.admin, key="legacy-token-123", only_if_empty=True)
    assert await store.create("again", Scope.admin, key="other", only_if_empty=True) is None
    assert (await store.authenticate("legacy-token-123", Scope.admin)).name == "admin"


@pytest.mark.gen_test
async def test_first_start_writes_admin_key_file_with_mode_0600(store, tmp_path, redis_server):
    settings = make_settings(tmp_path, redis_server.url)
    tmp_path.mkdir(exist_ok=True)
    await bootstrap_admin_key(settings, store)
    path = tmp_path / "admin.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    assert (await store.authenticate(key, Scope.admin)).scope is Scope.admin
    await bootstrap_admin_key(settings, store)  # keys exist now: nothing changes
    assert path.read_text().strip() == key and len(await store.list()) == 1
