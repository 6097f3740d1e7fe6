"""The docs stay true.

- README.md, "First session with curl": each command, run with curl against a real server, answers as the
  session's comments say.
- docs/operations.md, "Inspecting the index with redis-cli": its key table is casimg's key space, every key
  a real server writes is in it with the documented type, and each documented redis-cli command, run
  against a real server (the embedded one, and an external Redis set up with config/redis.conf), answers
  as it says.
- The generated pages (docs/settings.md, the reference in docs/cli.md) are what scripts/gen_docs.py
  writes from the code today.
- The README stays a short front page that links every page in docs/, and every relative link in the
  docs leads to a file and heading that exist.
"""

from __future__ import annotations

import glob
import inspect
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime
from urllib.parse import quote

import pytest
import redis

from bench.procs import start, stop, wait_port
from casimg.embedded import (
    COMPACT_HASH_ENTRIES,
    COMPACT_HASH_VALUE,
    COMPACT_ZSET_ENTRIES,
    COMPACT_ZSET_VALUE,
    EmbeddedRedis,
    find_redis_server,
)
from casimg.schema import KeySpace
from tests.procs import ROOT, Server, expected_bytes, free_port

OPERATIONS = ROOT / "docs" / "operations.md"
SECTION = "## Inspecting the index with redis-cli"
TYPES = {"hash": "hash", "sorted set": "zset", "set": "set", "string": "string", "stream": "stream", "list": "list"}
PLACEHOLDER_RE = re.compile(r"\{(\w+)\}")
# What a documented command line asks for: its Redis command and key, e.g. "HGET casimg:url".
ASKS_RE = re.compile(r"\b(HGETALL|HGET|HSCAN|XINFO GROUPS|ZRANGE) \"?(casimg:[a-z-]+)")


def section() -> str:
    page = OPERATIONS.read_text()
    assert SECTION in page
    body = page.split(SECTION, 1)[1]
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
    """Every key KeySpace builds, with its arguments as the key table writes them: job:{id}, worker:{name}."""
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
    assert found, f"the documented redis-cli path {pattern} does not exist in this checkout"
    return found[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory, origin):
    """A server that has stored, deduplicated and failed URLs, with a job to look at."""
    data_dir = tmp_path_factory.mktemp("readme") / "data"
    running = Server(data_dir, env={"CASIMG_ORIGIN_RATE": "10"})  # the default, which tests/procs.py turns off
    running.urls = [origin.url("/img/500.jpg"), origin.url("/dup/one.jpg"), origin.url("/dup/two.jpg")]
    running.job = running.submit([*running.urls, origin.url("/status/404")])
    assert running.call("GET", "/api/images", key="casimg_000000000000_" + "x" * 43)[0] == 401  # an authfail key
    yield running
    code = running.terminate()
    if EmbeddedRedis(data_dir).alive():  # stopped even when the server did not stop cleanly
        EmbeddedRedis(data_dir).stop()
    assert code == 0


def test_every_key_a_server_writes_is_in_the_table_with_its_type(server):
    table = {re.compile("^" + PLACEHOLDER_RE.sub(r"[^:]+", re.escape(k).replace(r"\{", "{").replace(r"\}", "}"))
                        + "$"): (k, kind) for k, kind in key_table().items()}
    client = redis.Redis(unix_socket_path=str(server.data_dir / "redis" / "redis.sock"), decode_responses=True)
    seen = set()

    def check(key: str) -> None:
        matches = [documented for pattern, documented in table.items() if pattern.match(key)]
        assert len(matches) == 1, f"{key} is not (exactly once) in the key table of docs/operations.md"
        pattern, kind = matches[0]
        seen.add(pattern)
        assert client.type(key) == TYPES[kind.removesuffix(" with TTL")], key
        assert (client.pttl(key) > 0) == kind.endswith("with TTL") or pattern.startswith("casimg:job"), key

    for key in client.scan_iter(count=1000):
        check(key)
    # A variant's keys, made after the scan above: a render outlasts an origin's rate key.
    assert server.call("GET", f"/api/image?url={quote(server.urls[0], safe='')}&w=8")[0] == 200
    for key in client.scan_iter("casimg:variant*", count=1000):
        check(key)
    # The placeholders' keys, once the server's filler has made them after the store.
    deadline = time.monotonic() + 60
    while client.exists("casimg:placeholder-todo") and time.monotonic() < deadline:
        time.sleep(0.05)
    for key in client.scan_iter("casimg:placeholder*", count=1000):
        check(key)
    client.close()
    # held only while a sweep runs, a job is queued, for seconds after an origin's 429 or 503, while a
    # callback waits to be delivered, while placeholders wait for the filler; the store record from the
    # first store migration on
    transient = {"casimg:sweep-lock", "casimg:enqueuing", "casimg:origin-cool:{origin}",
                 "casimg:origin-backoff:{origin}", "casimg:webhooks", "casimg:placeholder-todo", "casimg:store",
                 "casimg:store-copied:{migration}",
                 "casimg:variant-claim:{source}:{canonical}",
                 "casimg:claims:{digest}", "casimg:deleting:{digest}", "casimg:tomb"}  # an object store's only
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
    variants = sum(1 for _ in redis.Redis(unix_socket_path=str(server.data_dir / "redis" / "redis.sock"))
                   .scan_iter("casimg:variants:*"))  # one, when the key table's test made it
    # Two URLs share one content; a variant is a content too.
    assert dict(zip(counts[::2], counts[1::2], strict=True)) == {"urls": "3", "blobs": str(2 + variants)}
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
    owners = answers.pop("ZRANGE casimg:queue-owners")  # the job's key, its queue empty again: not inf
    assert owners[0] == server.key.split("_")[1] and float(owners[1]) > 0 and owners[1] != "inf"
    assert not answers, f"documented commands this test does not check yet: {sorted(answers)}"


def test_the_external_redis_command_against_a_redis_run_with_config_redis_conf(tmp_path, origin):
    """config/redis.conf runs the redis-server casimg uses; only where it listens and keeps its files changes."""
    port, redis_dir = free_port(), tmp_path / "redis"
    redis_dir.mkdir()
    conf = (ROOT / "config" / "redis.conf").read_text()
    assert re.search(r"^dir /var/lib/redis$", conf, re.MULTILINE)
    # Redis changes to `dir` while it reads the file, so the directory is replaced in a copy, not overridden.
    (tmp_path / "redis.conf").write_text(re.sub(r"^dir .*$", f"dir {redis_dir}", conf, flags=re.MULTILINE))
    external = start([find_redis_server(), str(tmp_path / "redis.conf"), "--port", str(port), "--bind", "127.0.0.1"],
                     redis_dir / "redis.log", lambda process: wait_port(port, process))
    server = None
    try:
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
        stop(external)


def test_redis_conf_is_the_production_config_the_docs_promise():
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
    assert int(conf["zset-max-ziplist-entries"]) == COMPACT_ZSET_ENTRIES
    assert int(conf["zset-max-ziplist-value"]) == COMPACT_ZSET_VALUE
    assert "config/redis.conf" in OPERATIONS.read_text()


README_LIMIT = 8 * 1024  # the front page: what a newcomer needs first; the rest belongs in docs/
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
HEADING_RE = re.compile(r"^#+ (.+)$", re.MULTILINE)
PAGES = [ROOT / "README.md", ROOT / "SECURITY.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_generated_pages_are_what_gen_docs_writes_today():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < README_LIMIT, "README.md has grown past 8 KB: move the detail into docs/"
    linked = set(LINK_RE.findall(readme))
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in linked, f"README.md does not link docs/{page.name}"


def anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    for target in LINK_RE.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s) and mailto links are not this repository's
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} leads nowhere"
        if fragment:
            headings = {anchor(h) for h in HEADING_RE.findall(linked.read_text())}
            assert fragment in headings, f"{page.name}: {target}: no such heading in {linked.name}"


CURL_SECTION = "## First session with curl"


def curl_session() -> tuple[str, list[str]]:
    """(the key line, the session's commands with continuation lines joined and comments left out)."""
    body = (ROOT / "README.md").read_text().split(CURL_SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", body, re.DOTALL)
    assert block, "no sh block in the README's curl session"
    lines = [line.strip() for line in block.group(1).replace("\\\n", " ").splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert commands[0].startswith("KEY="), "the session starts by reading the admin key"
    return commands[0], commands[1:]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_readme_curl_session_answers_as_it_says(tmp_path, origin):
    key_line, commands = curl_session()
    server = Server(tmp_path / "data")
    first, second = origin.url("/img/700.jpg"), origin.url("/img/701.png")
    replacements = {"localhost:9000": f"127.0.0.1:{server.port}", "data/admin.key": str(server.data_dir / "admin.key"),
                    "https://example.com/a.jpg": first, "https://example.com/b.png": second}

    def run(command: str) -> str:
        for old, new in replacements.items():
            command = command.replace(old, new)
        result = subprocess.run(["bash", "-c", f"set -e; {key_line}; {command}"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{command}: {result.stderr}"
        return result.stdout

    try:
        submit, poll, listing, fetch, delete = commands
        job = json.loads(run(submit))
        assert (job["status"], job["total"]) == ("queued", 2) and set(job) == {"job_id", "status", "total"}
        replacements["5f0c..."] = job["job_id"]
        deadline = time.monotonic() + 60
        while (polled := json.loads(run(poll)))["status"] != "done":
            assert polled["job_id"] == job["job_id"] and time.monotonic() < deadline, polled
            time.sleep(0.1)
        assert [r["status"] for r in polled["results"]] == ["stored", "stored"], polled
        head, _, page = run(listing).replace("\r\n", "\n").partition("\n\n")
        assert head.startswith("HTTP/1.1 200") and "X-Total-Count: 2" in head
        assert {image["url"] for image in json.loads(page)} == {first, second}
        assert run(fetch) == "" and (tmp_path / "a.jpg").read_bytes() == expected_bytes(first)
        assert run(delete) == ""
        assert server.call("GET", "/api/image?url=" + quote(first, safe=""))[0] == 404
    finally:
        code = server.terminate()
        if EmbeddedRedis(server.data_dir).alive():  # stopped even when the server did not stop cleanly
            EmbeddedRedis(server.data_dir).stop()
        assert code == 0
