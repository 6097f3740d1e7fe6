"""README's "Inspecting the index with redis-cli" stays true: its key table is casimg's key space, every key a
real server writes is in it with the documented type, and each documented redis-cli command, run against
a real server (the embedded one, and an external Redis set up with config/redis.conf), answers as it says."""

from __future__ import annotations

import glob
import inspect
import json
import re
import shlex
import socket
import subprocess
import time
from datetime import datetime
from urllib.parse import quote

import pytest
import redis

from casimg.embedded import COMPACT_HASH_ENTRIES, COMPACT_HASH_VALUE, EmbeddedRedis, find_redis_server
from casimg.index import KeySpace
from tests.procs import ROOT, Server, free_port

SECTION = "## Inspecting the index with redis-cli"
TYPES = {"hash": "hash", "sorted set": "zset", "set": "set", "string": "string", "stream": "stream", "list": "list"}
PLACEHOLDER_RE = re.compile(r"\{(\w+)\}")
# What a documented command line asks for: its Redis command and key, e.g. "HGET casimg:url".
ASKS_RE = re.compile(r"\b(HGETALL|HGET|HSCAN|XINFO GROUPS) \"?(casimg:[a-z-]+)")


def section() -> str:
    readme = (ROOT / "README.md").read_text()
    assert SECTION in readme
    body = readme.split(SECTION, 1)[1]
    return body.split("\n## ", 1)[0]


def key_table() -> dict[str, str]:
    """key pattern -> documented type, from the section's table."""
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+?) \|", section(), re.MULTILINE)
    assert rows, "no key table in the section"
    return dict(rows)


def commands() -> list[str]:
    block = re.search(r"```sh\n(.*?)```", section(), re.DOTALL)
    assert block, "no sh block in the section"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def documented_keys(prefix: str = "casimg:") -> set[str]:
    """Every key KeySpace builds, with its arguments as README writes them: job:{id}, worker:{name}."""
    space, names = KeySpace(prefix), set()
    for name, member in inspect.getmembers(KeySpace):
        if name.startswith("_") or name == "prefix":
            continue
        if isinstance(member, property):
            names.add(getattr(space, name))
        elif inspect.isfunction(member):
            params = list(inspect.signature(member).parameters)[1:]
            names.add(getattr(space, name)(*("{id}" if p == "job_id" else "{" + p + "}" for p in params)))
    return names


def test_the_key_table_lists_exactly_the_keys_of_keyspace():
    assert set(key_table()) == documented_keys()
    for key, kind in key_table().items():
        assert kind.removesuffix(" with TTL") in TYPES, f"{key}: unknown type {kind!r}"


def cli_path() -> str:
    line = next(c for c in commands() if c.startswith("CLI="))
    pattern = shlex.split(line.split("=", 1)[1])[0]
    found = glob.glob(str(ROOT / pattern))
    assert found, f"the README's redis-cli path {pattern} does not exist in this checkout"
    return found[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory, origin):
    """A server that has stored, deduplicated and failed URLs, with a job to look at."""
    data_dir = tmp_path_factory.mktemp("readme") / "data"
    running = Server(data_dir)
    running.urls = [origin.url("/img/500.jpg"), origin.url("/dup/one.jpg"), origin.url("/dup/two.jpg")]
    running.job = running.submit([*running.urls, origin.url("/status/404")])
    assert running.call("GET", "/api/images", key="casimg_000000000000_" + "x" * 43)[0] == 401  # an authfail key
    yield running
    assert running.terminate() == 0
    if EmbeddedRedis(data_dir).alive():
        EmbeddedRedis(data_dir).stop()


def test_every_key_a_server_writes_is_in_the_table_with_its_type(server):
    table = {re.compile("^" + PLACEHOLDER_RE.sub(r"[^:]+", re.escape(k).replace(r"\{", "{").replace(r"\}", "}"))
                        + "$"): (k, kind) for k, kind in key_table().items()}
    client = redis.Redis(unix_socket_path=str(server.data_dir / "redis" / "redis.sock"), decode_responses=True)
    seen = set()
    for key in client.scan_iter(count=1000):
        matches = [documented for pattern, documented in table.items() if pattern.match(key)]
        assert len(matches) == 1, f"{key} is not (exactly once) in README's key table"
        pattern, kind = matches[0]
        seen.add(pattern)
        assert client.type(key) == TYPES[kind.removesuffix(" with TTL")], key
        assert (client.pttl(key) > 0) == kind.endswith("with TTL") or pattern.startswith("casimg:job"), key
    client.close()
    transient = {"casimg:sweep-lock"}  # held only while a sweep runs
    assert set(key_table()) - transient <= seen


def run_cli(line: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        line = line.replace(old, new)
    # Through bash, as an operator runs them: the lines use command substitution, pipes and here-strings.
    result = subprocess.run(["bash", "-c", "set -o pipefail; " + line], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "ERR" not in result.stdout, f"{line}: {result.stdout} {result.stderr}"
    assert result.stdout.strip(), f"{line} printed nothing"
    return result.stdout


def test_each_documented_command_answers_as_documented_on_the_embedded_redis(server, origin):
    url, digest = server.urls[0], server.job["results"][0]["sha256"]
    replacements = {
        "$CLI": cli_path(),
        "data/redis/redis.sock": str(server.data_dir / "redis" / "redis.sock"),
        "https://example.com/a.jpg": url,
        "*example.com*": f"*{origin.host}:{origin.port}/img/*",
        "<sha256>": digest,
        "<job_id>": server.job["job_id"],
    }
    embedded = [c for c in commands() if "data/redis/redis.sock" in c]
    answers = {}
    for line in embedded:
        asks = ASKS_RE.search(line)
        assert asks, f"{line}: which Redis command does it document?"
        answers[" ".join(asks.groups())] = run_cli(line, replacements).splitlines()
    counts = answers.pop("HGETALL casimg:count")
    assert dict(zip(counts[::2], counts[1::2], strict=True)) == {"urls": "3", "blobs": "2"}  # two URLs share one
    status, body, _ = server.call("GET", "/api/image?url=" + quote(url, safe=""))
    listed = next(image for image in json.loads(server.call("GET", "/api/images")[1]) if image["url"] == url)
    assert status == 200 and listed["size"] == len(body)
    stored_ms = round(datetime.fromisoformat(listed["stored_at"].replace("Z", "+00:00")).timestamp() * 1000)
    value = f"{digest} {stored_ms} {listed['size']} {listed['width']} {listed['height']} {listed['content_type']}"
    assert answers.pop("HGET casimg:url") == [value]
    assert answers.pop("HSCAN casimg:url") == [url, value]  # the pattern matches the /img/ URL
    assert answers.pop("HGET casimg:blob") == ["1"]
    job = answers.pop("HGETALL casimg:job")
    fields = dict(zip(job[::2], job[1::2], strict=True))
    assert (fields["status"], fields["total"], fields["stored"], fields["failed"]) == ("done", "4", "3", "1")
    groups = answers.pop("XINFO GROUPS casimg:queue")
    assert groups[groups.index("name") + 1] == "workers" and groups[groups.index("pending") + 1] == "0"
    assert not answers, f"documented commands this test does not check yet: {sorted(answers)}"


def test_the_external_redis_command_against_a_redis_run_with_config_redis_conf(tmp_path, origin):
    """config/redis.conf runs the redis-server casimg uses; only where it listens and keeps its files changes."""
    port, redis_dir = free_port(), tmp_path / "redis"
    redis_dir.mkdir()
    conf = (ROOT / "config" / "redis.conf").read_text()
    assert re.search(r"^dir /var/lib/redis$", conf, re.MULTILINE)
    # Redis changes to `dir` while it reads the file, so the directory is replaced in a copy, not overridden.
    (tmp_path / "redis.conf").write_text(re.sub(r"^dir .*$", f"dir {redis_dir}", conf, flags=re.MULTILINE))
    external = subprocess.Popen(
        [find_redis_server(), str(tmp_path / "redis.conf"), "--port", str(port), "--bind", "127.0.0.1",
         "--logfile", str(redis_dir / "redis.log")], stdin=subprocess.DEVNULL)
    server = None
    try:
        deadline = time.monotonic() + 20
        while True:
            assert external.poll() is None, (redis_dir / "redis.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server with config/redis.conf did not start"
                time.sleep(0.05)
        client = redis.Redis(port=port, decode_responses=True)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        url = f"redis://127.0.0.1:{port}"
        server = Server(tmp_path / "data", "--redis-url", url)
        server.submit([origin.url("/img/501.jpg"), origin.url("/img/502.jpg")])
        line = next(c for c in commands() if c.startswith("redis-cli -u "))
        answer = run_cli(line, {"redis-cli": cli_path(), "redis://redis.internal:6379": url})
        assert answer.split() == ["2"]
        assert (redis_dir / "casimg.aof").stat().st_size > 0 or list(redis_dir.glob("appendonlydir/*"))
        client.close()
    finally:
        if server is not None:
            assert server.terminate() == 0
        external.terminate()
        external.wait(20)


def test_redis_conf_is_the_production_config_the_readme_promises():
    conf = {}
    for line in (ROOT / "config" / "redis.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition(" ")
            conf[name] = value.strip()
    assert conf["appendonly"] == "yes" and conf["appendfsync"] in ("everysec", "always")
    assert conf["maxmemory-policy"] == "noeviction"
    assert conf["save"] == '""'  # the AOF is the persistence; no RDB snapshots beside it
    assert int(conf["hash-max-ziplist-entries"]) == COMPACT_HASH_ENTRIES  # as the embedded Redis runs
    assert int(conf["hash-max-ziplist-value"]) == COMPACT_HASH_VALUE
    assert "config/redis.conf" in (ROOT / "README.md").read_text()
