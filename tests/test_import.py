"""Bulk import: input formats, then real imports of thousands of URLs into a real `casimg serve`,
including runs interrupted by SIGINT and by SIGKILL that resume from their state file."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from casimg.embedded import EmbeddedRedis
from casimg.importer import EXIT_AUTH, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_UNREACHABLE, detect_format, read_urls
from tests.procs import ROOT, Server, casimg, free_port

SUMMARY_RE = re.compile(r"^(\d+) submitted, (\d+) stored, (\d+) existed, (\d+) failed in [\d.]+ s$")
# The origin is one Python thread per connection: let the server use more of them than the default 8.
SERVER_ENV = {"CASIMG_PER_HOST_CONCURRENCY": "32", "CASIMG_FETCH_TIMEOUT": "10"}


# -- input --------------------------------------------------------------------------------------------


def test_text_skips_blanks_and_comments_and_drops_duplicates(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("# a list\nhttp://a/1.jpg\n\n  http://a/2.jpg  \nhttp://a/1.jpg\n   # indented comment\n")
    found = read_urls(str(path))
    assert found.urls == ["http://a/1.jpg", "http://a/2.jpg"]
    assert (found.duplicates, found.skipped) == (1, 0)


@pytest.mark.parametrize(("name", "body"), [
    ("list.csv", "id,url,title\n1,http://a/1.jpg,one\n2,http://a/2.jpg,\"two, with a comma\"\n3,http://a/1.jpg,x\n"),
    ("list.csv", "http://a/1.jpg,one\nhttp://a/2.jpg,two\n"),  # no header: the first column
    ("list.csv", "link,title\nhttp://a/1.jpg,one\nhttp://a/2.jpg,two\n"),  # a header without url: the first
    ("export", "name,URL\nx,http://a/1.jpg\ny,http://a/2.jpg\n"),  # recognised as CSV by its url column
    ("list.json", '["http://a/1.jpg", {"url": "http://a/2.jpg"}, "http://a/2.jpg", 7]'),
    ("noext", '  [\n"http://a/1.jpg",\n"http://a/2.jpg"]'),
    ("list.jsonl", '"http://a/1.jpg"\n\n{"url": "http://a/2.jpg", "tag": 1}\n'),
    ("noext", '{"url": "http://a/1.jpg"}\n{"url": "http://a/2.jpg"}\n'),
])
def test_csv_json_and_json_lines(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(body)
    assert read_urls(str(path)).urls == ["http://a/1.jpg", "http://a/2.jpg"]


def test_stdin_and_format_detection():
    found = read_urls("-", stdin=io.StringIO("http://a/1.jpg\nhttp://a/2.jpg\n"))
    assert found.urls == ["http://a/1.jpg", "http://a/2.jpg"]
    assert detect_format("-", "http://a/x,y.jpg\n") == "text"  # a comma alone does not make CSV
    assert detect_format("-", "[]") == "json" and detect_format("x.txt", "url\nhttp://a\n") == "text"


def test_entries_that_are_not_urls_are_counted_as_skipped(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('["http://a/1.jpg", 3, null, {"name": "x"}, ""]')
    found = read_urls(str(path))
    assert found.urls == ["http://a/1.jpg"] and found.skipped == 4


# -- against a real server ----------------------------------------------------------------------------


def _serve(data_dir: Path):
    running = Server(data_dir, env=SERVER_ENV)
    yield running
    assert running.terminate() == 0
    if EmbeddedRedis(data_dir).alive():
        EmbeddedRedis(data_dir).stop()


@pytest.fixture
def fresh(tmp_path):
    """A server of its own, for tests that count everything in it."""
    yield from _serve(tmp_path / "data")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the tests that only look at their own URLs (each server costs seconds to stop)."""
    yield from _serve(tmp_path_factory.mktemp("import") / "data")


def run_import(*args: str, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "scripts/bulk_import.py", *args], cwd=ROOT, capture_output=True,
                          text=True, input=stdin, timeout=timeout, env={**os.environ, "CASIMG_API_KEY": ""})


def start_import(*args: str) -> subprocess.Popen[str]:
    # SIGINT as from a terminal: under a shell's background job (`... &`) the tests inherit it ignored,
    # and Python leaves an ignored SIGINT ignored, so the interrupt tests would never interrupt.
    return subprocess.Popen([sys.executable, "-m", "casimg", "import", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def summary(output: str) -> tuple[int, int, int, int]:
    last = output.strip().splitlines()[-1]
    match = SUMMARY_RE.match(last)
    assert match, f"no summary line in {output!r}"
    return tuple(int(n) for n in match.groups())  # type: ignore[return-value]


def jobs_done(server: Server) -> int:
    stats = json.loads(casimg("stats", "--json", "--data-dir", str(server.data_dir)).stdout)
    return stats["jobs"]["done"] + stats["jobs"]["running"] + stats["jobs"]["queued"]


def test_import_of_thousands_of_urls_with_failures_and_duplicates(fresh, origin, tmp_path):
    server = fresh
    already = origin.url("/img/20000.jpg")
    server.submit([already])
    urls = [origin.url(f"/img/{n}.jpg") for n in range(20000, 22500)]
    failing = [origin.url("/status/404"), origin.url("/html")]
    lines = ["# exported list", *urls, "", *failing, urls[5], urls[6]]
    source = tmp_path / "urls.txt"
    source.write_text("\n".join(lines) + "\n")
    failures = tmp_path / "failed.csv"

    started = time.monotonic()
    result = run_import(str(source), "--api", server.base, "--key", server.key, "--failures", str(failures),
                        "--interval", "0.5")
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert summary(result.stdout) == (2502, 2499, 1, 2)
    assert "2502 distinct URLs (2 duplicates dropped" in result.stderr
    assert re.search(r"import: \d+/2502 URLs finished \(\d+ stored, \d+ existed, \d+ failed\), \d+ URL/s, ETA",
                     result.stderr), "plain progress lines when stderr is not a terminal"
    assert "\r" not in result.stderr  # no progress bar when not on a terminal
    assert failures.read_text().splitlines() == [
        "url,reason", f"{failing[0]},HTTP 404", f"{failing[1]},not an image"]
    status, _, headers = server.call("GET", "/api/images?limit=1")
    assert status == 200 and headers["X-Total-Count"] == "2500"
    assert jobs_done(server) == 1 + 6  # the single submit, and 2502 URLs in batches of 500
    print(f"imported 2502 URLs in {seconds:.1f} s ({2502 / seconds:.0f} URL/s)")

    again = run_import(str(source), "--api", server.base, "--key", server.key, "--batch-size", "1000")
    assert again.returncode == 0, again.stderr
    assert summary(again.stdout) == (2502, 0, 2500, 2)  # without --resume everything is sent again


def test_stdin_and_casimg_import_read_the_same_lists(server, origin):
    urls = [origin.url(f"/img/{n}.gif") for n in range(23000, 23010)]
    body = json.dumps([{"url": url} for url in urls])
    result = run_import("-", "--api", server.base, "--key", server.key, "--format", "json", stdin=body)
    assert result.returncode == 0, result.stderr
    assert summary(result.stdout) == (10, 10, 0, 0)
    key_file = server.data_dir / "admin.key"
    text = subprocess.run([sys.executable, "-m", "casimg", "import", "-", "--api", server.base, "--key-file",
                           str(key_file)], input="\n".join(urls), capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert text.returncode == 0, text.stderr
    assert summary(text.stdout) == (10, 0, 10, 0)


def wait_for_done_batches(state: Path, at_least: int, process: subprocess.Popen[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if state.exists():
            saved = json.loads(state.read_text())
            if len(saved["done"]) >= at_least:
                return saved
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} batches done in {timeout} s")


def test_interrupted_import_resumes_without_resubmitting_what_was_done(fresh, origin, tmp_path):
    server = fresh
    count, batch, in_flight = 2000, 100, 3
    source = tmp_path / "urls.csv"
    source.write_text("url\n" + "\n".join(origin.url(f"/img/{n}.webp") for n in range(30000, 30000 + count)))
    state, failures = tmp_path / "import.state", tmp_path / "failed.csv"
    args = [str(source), "--api", server.base, "--key", server.key, "--batch-size", str(batch),
            "--in-flight", str(in_flight), "--resume", str(state), "--failures", str(failures)]

    first = start_import(*args)
    wait_for_done_batches(state, 5, first)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == EXIT_INTERRUPTED, err
    assert f"interrupted; rerun with --resume {state} to continue" in err
    saved = json.loads(state.read_text())
    assert 5 <= len(saved["done"]) < count // batch
    assert jobs_done(server) == len(saved["done"]) + len(saved["jobs"])  # every job the state knows, no other

    second = start_import(*args)
    wait_for_done_batches(state, len(saved["done"]) + 5, second)
    second.kill()  # no chance to save anything: the state file is what the last finished batch left
    second.wait()
    killed = json.loads(state.read_text())
    assert len(killed["done"]) < count // batch

    third = subprocess.run([sys.executable, "-m", "casimg", "import", *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=180)
    assert third.returncode == 0, third.stderr
    assert f"resuming from {state}: {len(killed['done'])} batches done" in third.stderr
    submitted, stored, existed, failed = summary(third.stdout)
    assert (submitted, failed) == (count, 0)
    # Only the batches whose POST was in flight at the kill -9 can have been sent twice; they come back `exists`.
    assert stored + existed == count and existed <= in_flight * batch
    assert jobs_done(server) <= count // batch + in_flight
    status, _, headers = server.call("GET", "/api/images?limit=1")
    assert status == 200 and headers["X-Total-Count"] == str(count)
    assert failures.read_text() == "url,reason\n"
    final = json.loads(state.read_text())
    assert len(final["done"]) == count // batch and final["jobs"] == {}

    rerun = subprocess.run([sys.executable, "-m", "casimg", "import", *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert rerun.returncode == 0 and summary(rerun.stdout)[:2] == (count, stored)  # nothing left: nothing sent
    assert jobs_done(server) <= count // batch + in_flight


def test_state_of_another_list_is_refused(server, origin, tmp_path):
    state = tmp_path / "import.state"
    (tmp_path / "a.txt").write_text(origin.url("/img/40000.jpg") + "\n")
    (tmp_path / "b.txt").write_text(origin.url("/img/40001.jpg") + "\n")
    first = run_import(str(tmp_path / "a.txt"), "--api", server.base, "--key", server.key, "--resume", str(state))
    assert first.returncode == 0, first.stderr
    other = run_import(str(tmp_path / "b.txt"), "--api", server.base, "--key", server.key, "--resume", str(state))
    assert other.returncode == EXIT_INPUT and "different URL list" in other.stderr


def test_unreachable_api_and_refused_key_fail_clearly(server, tmp_path):
    source = tmp_path / "urls.txt"
    source.write_text("http://127.0.0.1/a.jpg\n")
    started = time.monotonic()
    down = run_import(str(source), "--api", f"http://127.0.0.1:{free_port()}", "--key", "k")
    assert down.returncode == EXIT_UNREACHABLE and "API unreachable" in down.stderr
    assert time.monotonic() - started < 20
    refused = run_import(str(source), "--api", server.base, "--key", "casimg_000000000000_wrong-key-wrong-key")
    assert refused.returncode == EXIT_AUTH and "refused the key" in refused.stderr and "401" in refused.stderr
    created = casimg("keys", "create", "--name", "reader", "--scope", "read", "--data-dir", str(server.data_dir))
    reader = created.stdout.strip().splitlines()[-1]
    read_only = run_import(str(source), "--api", server.base, "--key", reader)
    assert read_only.returncode == EXIT_AUTH and "403" in read_only.stderr
    no_key = run_import(str(source), "--api", server.base)
    assert no_key.returncode == EXIT_INPUT and "no API key" in no_key.stderr
    missing = run_import(str(tmp_path / "nope.txt"), "--api", server.base, "--key", "k")
    assert missing.returncode == EXIT_INPUT and "cannot read" in missing.stderr


def test_progress_bar_on_a_terminal(server, origin, tmp_path):
    import pty
    import threading

    source = tmp_path / "urls.txt"
    source.write_text("\n".join(origin.url(f"/img/{n}.jpg") for n in range(41000, 41300)))
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # read while it runs: what is left unread when the terminal closes may be lost
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    process = subprocess.Popen([sys.executable, "scripts/bulk_import.py", str(source), "--api", server.base,
                                "--key", server.key, "--batch-size", "50"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=slave, text=True)
    os.close(slave)
    out, _ = process.communicate(timeout=120)
    reader.join(10)
    os.close(master)
    bar = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 0, bar
    assert summary(out) == (300, 300, 0, 0)
    assert "\r" in bar and "300/300" in bar and "url/s" in bar  # tqdm redraws one line: count, rate
    assert re.search(r"stored=\d+, existed=0, failed=0", bar)
    assert "URLs finished (" not in bar  # no plain lines on a terminal
