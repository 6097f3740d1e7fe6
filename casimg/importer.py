"""Bulk import: read a URL list, submit it in batches to a running casimg, follow the jobs to the end.

`casimg import` and `scripts/bulk_import.py` are this module. It talks to the server only through
``casimg.client``, so it runs from any machine that can reach the API.

- Input: plain text (one URL a line; blank lines and # comments skipped), CSV (the `url` column, else the
  first), a JSON array (of strings, or of objects with a `url`), or JSON lines. Duplicates are dropped,
  first occurrence kept, so the batches are the same on every run over the same file.
- Batches (default 500 URLs) are submitted by a few threads (default 4 in flight); each thread follows
  its job until it is done, then takes the next batch.
- ``--resume STATE`` keeps, in a small JSON file replaced atomically after every submit and every finished
  batch, which batches are done (with their counts) and the job id of each batch submitted but not done.
  A rerun skips the done batches, follows the submitted ones by job id (resubmitting only a batch whose
  job has expired), and submits the rest: nothing finished is sent again. Only a batch whose POST was in
  flight when the process was killed -9 can be sent twice, which is harmless (its URLs come back `exists`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from casimg.client import ApiError, ApiUnreachable, AuthError, Client, ClientError, Job, NotFoundError

DESCRIPTION = (
    "Submit a file of image URLs to a running casimg server in batches and follow the jobs to the end. "
    "Ends with one line: 'N submitted, N stored, N existed, N failed in T s'. Exit status: 0 when every "
    "URL was submitted and finished (URLs that failed to download are counted, not an error); 1 bad input "
    "or state file; 2 API unreachable; 3 key refused; 4 other API error; 130 interrupted (rerun with the "
    "same --resume STATE to continue)."
)
EXIT_OK, EXIT_INPUT, EXIT_UNREACHABLE, EXIT_AUTH, EXIT_API, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
DEFAULT_BATCH = 500
DEFAULT_IN_FLIGHT = 4
POLL = 0.5  # seconds between polls of a job in flight
STATE_VERSION = 1
PREFLIGHT_RETRIES = 2
FALLBACK_SIZE = (100, 24)


SUFFIXES = ((".csv", "csv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".txt", "text"))


class InputError(Exception):
    """The URL file or the state file cannot be used."""


# -- reading ------------------------------------------------------------------------------------------


@dataclass
class UrlList:
    urls: list[str]
    duplicates: int = 0
    skipped: int = 0  # entries that are not a URL string (a number, an object without "url"...)

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for url in self.urls:
            digest.update(url.encode("utf-8", "surrogatepass") + b"\n")
        return digest.hexdigest()


def detect_format(name: str, text: str) -> str:
    lowered = name.lower()
    for suffix, kind in SUFFIXES:
        if lowered.endswith(suffix):
            return kind
    start = text.lstrip()[:1]
    if start == "[":
        return "json"
    if start in ("{", '"'):
        return "jsonl"
    first = next((line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")), "")
    if "url" in (cell.strip().strip('"').lower() for cell in first.split(",")):
        return "csv"
    return "text"


def parse_urls(text: str, fmt: str) -> Iterable[Any]:
    """The raw entries of a URL file, in order; each should be a URL string."""
    if fmt == "text":
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                yield line
    elif fmt == "csv":
        rows = csv.reader(io.StringIO(text))
        column, first = 0, next(rows, None)
        if first is not None:
            names = [cell.strip().lower() for cell in first]
            if "url" in names:
                column = names.index("url")
            elif first and "://" in first[0]:
                yield first[0].strip()  # no header row: the first row is data
        for row in rows:
            if len(row) > column and row[column].strip():
                yield row[column].strip()
    elif fmt == "json":
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise InputError(f"not a JSON document: {exc}") from None
        if not isinstance(document, list):
            raise InputError("a JSON file must hold an array of URLs (or of objects with a \"url\")")
        for item in document:
            yield _from_json_item(item)
    elif fmt == "jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield _from_json_item(json.loads(line))
                except ValueError:
                    raise InputError(f"line {number} is not JSON") from None
    else:
        raise InputError(f"unknown format {fmt!r}")


def _from_json_item(item: Any) -> Any:
    return item.get("url") if isinstance(item, dict) else item


def read_urls(source: str, fmt: str = "auto", stdin: TextIO | None = None) -> UrlList:
    """The distinct URLs of a file (`-` for stdin), in order of first appearance."""
    if source == "-":
        text = (stdin or sys.stdin).read()
    else:
        try:
            text = Path(source).read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise InputError(f"cannot read {source}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise InputError(f"{source} is not UTF-8 text") from None
    kind = detect_format(source, text) if fmt == "auto" else fmt
    seen: dict[str, None] = {}
    duplicates = skipped = 0
    for entry in parse_urls(text, kind):
        if not isinstance(entry, str) or not entry.strip():
            skipped += 1
        elif entry in seen:
            duplicates += 1
        else:
            seen[entry] = None
    return UrlList(list(seen), duplicates, skipped)


# -- state --------------------------------------------------------------------------------------------


@dataclass
class Counts:
    stored: int = 0
    existed: int = 0
    failed: int = 0

    @property
    def finished(self) -> int:
        return self.stored + self.existed + self.failed

    def add(self, other: Counts) -> None:
        self.stored += other.stored
        self.existed += other.existed
        self.failed += other.failed


@dataclass
class State:
    """What is done, kept in memory and, with --resume, in a file replaced atomically on every change."""

    fingerprint: str
    batch_size: int
    total_urls: int
    path: Path | None = None
    done: dict[int, Counts] = field(default_factory=dict)  # batch -> its final counts
    jobs: dict[int, str] = field(default_factory=dict)  # batch submitted, not yet done -> job id
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load_or_new(cls, path: Path | None, urls: UrlList, batch_size: int) -> State:
        state = cls(urls.fingerprint, batch_size, len(urls.urls), path)
        if path is None or not path.exists():
            return state
        try:
            saved = json.loads(path.read_text())
            if saved.get("version") != STATE_VERSION:
                raise InputError(f"{path} is not an import state file of this version")
            if saved["fingerprint"] != state.fingerprint:
                raise InputError(f"{path} was written for a different URL list; use a new state file")
            state.batch_size = int(saved["batch_size"])  # the saved batching is the one the done list refers to
            state.done = {int(k): Counts(*v) for k, v in saved["done"].items()}
            state.jobs = {int(k): str(v) for k, v in saved["jobs"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path} is not a usable import state file ({exc})") from None
        return state

    def save(self) -> None:
        """Write the state beside its final name, fsync, rename: a crash leaves the old or the new file."""
        if self.path is None:
            return
        body = json.dumps({
            "version": STATE_VERSION, "fingerprint": self.fingerprint, "batch_size": self.batch_size,
            "urls": self.total_urls,
            "done": {str(k): [c.stored, c.existed, c.failed] for k, c in sorted(self.done.items())},
            "jobs": {str(k): v for k, v in sorted(self.jobs.items())},
        })
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def job_submitted(self, batch: int, job_id: str) -> None:
        with self.lock:
            self.jobs[batch] = job_id
            self.save()

    def batch_done(self, batch: int, counts: Counts) -> None:
        with self.lock:
            self.jobs.pop(batch, None)
            self.done[batch] = counts
            self.save()

    def job_lost(self, batch: int) -> None:
        with self.lock:
            self.jobs.pop(batch, None)
            self.save()


# -- running ------------------------------------------------------------------------------------------


class Stopped(Exception):
    """The import is stopping (interrupted, or another batch hit a fatal error)."""


@dataclass
class Importer:
    client: Client
    urls: list[str]
    state: State
    in_flight: int = DEFAULT_IN_FLIGHT
    on_failed: Callable[[list[tuple[str, str]]], None] = lambda rows: None
    poll: float = POLL
    stop: threading.Event = field(default_factory=threading.Event)
    live: dict[int, Counts] = field(default_factory=dict)  # progress of the batches in flight
    submitted_now: int = 0  # URLs sent in this run
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def batches(self) -> int:
        return -(-len(self.urls) // self.state.batch_size)

    def batch(self, number: int) -> list[str]:
        size = self.state.batch_size
        return self.urls[number * size:(number + 1) * size]

    def totals(self) -> tuple[int, Counts]:
        """(URLs submitted, counts of finished URLs), over this run and the ones it resumes."""
        counts = Counts()
        with self.state.lock:
            done = list(self.state.done.items())
            followed = list(self.state.jobs)
        for _, batch_counts in done:
            counts.add(batch_counts)
        with self._lock:
            for live in self.live.values():
                counts.add(live)
        submitted = sum(len(self.batch(n)) for n, _ in done) + sum(len(self.batch(n)) for n in followed)
        return submitted, counts

    def run(self, report: Callable[[], None] = lambda: None) -> None:
        """Submit and follow every batch not done. Raises ClientError on a fatal error, KeyboardInterrupt."""
        todo = [n for n in range(self.batches) if n not in self.state.done]
        pool = ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix="import")
        futures: set[Future[None]] = {pool.submit(self._one, n) for n in todo}
        try:
            while futures:
                finished, futures = wait(futures, timeout=0.25, return_when=FIRST_COMPLETED)
                for future in finished:
                    error = future.exception()
                    if error is not None and not isinstance(error, Stopped):
                        raise error
                report()
        finally:
            self.stop.set()
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True)
            with self.state.lock:
                self.state.save()
        report()

    def _one(self, number: int) -> None:
        if self.stop.is_set():
            raise Stopped
        job_id = self.state.jobs.get(number)
        while True:
            if job_id is None:
                if self.stop.is_set():
                    raise Stopped
                urls = self.batch(number)
                job_id = self.client.submit(urls).job_id
                with self._lock:
                    self.submitted_now += len(urls)
                self.state.job_submitted(number, job_id)
            try:
                job = self._follow(number, job_id)
                break
            except NotFoundError:  # expired since an earlier run submitted it: send it again
                self.state.job_lost(number)
                job_id = None
        failures = [(r.url, r.error or "failed") for r in job.results if r.status == "failed"]
        if failures:
            self.on_failed(failures)
        self.state.batch_done(number, Counts(job.stored, job.existed, job.failed))
        with self._lock:
            self.live.pop(number, None)

    def _follow(self, number: int, job_id: str) -> Job:
        while True:
            job = self.client.job(job_id)
            with self._lock:
                self.live[number] = Counts(job.stored, job.existed, job.failed)
            if job.is_done:
                return job
            if self.stop.wait(self.poll):
                raise Stopped


class FailureLog:
    """--failures FILE: url,reason rows, appended as batches finish (a resumed import adds to the file)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lock = threading.Lock()
        if path is not None and (not path.exists() or path.stat().st_size == 0):
            with open(path, "w", newline="") as handle:
                csv.writer(handle).writerow(["url", "reason"])

    def write(self, rows: list[tuple[str, str]]) -> None:
        if self.path is None:
            return
        with self.lock, open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerows(rows)


class Progress:
    """A tqdm bar on a terminal; otherwise a plain line every `interval` seconds (and none with 'none')."""

    def __init__(self, importer: Importer, mode: str, interval: float, stream: TextIO) -> None:
        self.importer = importer
        self.stream = stream
        self.interval = interval
        self.started = time.monotonic()
        self.resumed = importer.totals()[1].finished
        self.last_line = self.started
        self.mode = ("bar" if stream.isatty() else "lines") if mode == "auto" else mode
        self.bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            try:
                columns, lines = os.get_terminal_size(stream.fileno())
            except (OSError, ValueError):
                columns, lines = 0, 0
            # tqdm draws nothing on a terminal that reports no size (a fresh pty, some `docker run -t`).
            self.bar = tqdm(total=len(importer.urls), initial=self.resumed, unit="url", file=stream,
                            ncols=columns or FALLBACK_SIZE[0], nrows=lines or FALLBACK_SIZE[1], smoothing=0.1)

    def __call__(self) -> None:
        counts = self.importer.totals()[1]
        if self.bar is not None:
            self.bar.update(counts.finished - self.bar.n)
            self.bar.set_postfix(  # a dict keeps this order; keyword arguments would be sorted
                {"stored": counts.stored, "existed": counts.existed, "failed": counts.failed}, refresh=False)
        elif self.mode == "lines" and time.monotonic() - self.last_line >= self.interval:
            self.last_line = time.monotonic()
            self.stream.write(self.line(counts) + "\n")
            self.stream.flush()

    def line(self, counts: Counts) -> str:
        total = len(self.importer.urls)
        elapsed = max(1e-6, time.monotonic() - self.started)
        rate = (counts.finished - self.resumed) / elapsed
        eta = f"{(total - counts.finished) / rate:.0f} s" if rate > 0 else "?"
        return (f"import: {counts.finished}/{total} URLs finished ({counts.stored} stored, {counts.existed} "
                f"existed, {counts.failed} failed), {rate:.0f} URL/s, ETA {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="URL list: plain text, CSV, a JSON array or JSON lines; - for stdin")
    parser.add_argument("--api", default=os.environ.get("CASIMG_API", "http://127.0.0.1:9000"),
                        help="the casimg API (default $CASIMG_API or http://127.0.0.1:9000)")
    parser.add_argument("--key", default=os.environ.get("CASIMG_API_KEY"),
                        help="API key with scope write (default $CASIMG_API_KEY; --key-file keeps it out of ps)")
    parser.add_argument("--key-file", type=Path, help="read the API key from this file (e.g. data/admin.key)")
    parser.add_argument("--format", default="auto", choices=["auto", "text", "csv", "json", "jsonl"],
                        help="input format (default: from the file name, else from the content)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"URLs per job (default {DEFAULT_BATCH})")
    parser.add_argument("--in-flight", type=int, default=DEFAULT_IN_FLIGHT,
                        help=f"batches submitted and followed at once (default {DEFAULT_IN_FLIGHT})")
    parser.add_argument("--failures", type=Path, help="write the URLs that failed, with reasons, to this CSV")
    parser.add_argument("--resume", type=Path, metavar="STATE",
                        help="state file: created if missing; a rerun with it continues where the last stopped")
    parser.add_argument("--progress", default="auto", choices=["auto", "bar", "lines", "none"],
                        help="auto: a bar on a terminal, plain lines otherwise")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between plain progress lines")
    parser.add_argument("--retries", type=int, default=5,
                        help="retries of 429, 503 and connection errors, with backoff (default 5)")


def run(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    """The import as a command: messages to stderr, the summary line to stdout; returns the exit status."""
    def fail(status: int, message: str) -> int:
        print(f"casimg import: error: {message}", file=sys.stderr)
        return status

    key = args.key
    if args.key_file is not None:
        try:
            key = args.key_file.read_text().strip()
        except OSError as exc:
            return fail(EXIT_INPUT, f"cannot read key file {args.key_file}: {exc.strerror}")
    if not key:
        return fail(EXIT_INPUT, "no API key: pass --key, --key-file or set CASIMG_API_KEY")
    if args.batch_size < 1 or args.in_flight < 1:
        return fail(EXIT_INPUT, "--batch-size and --in-flight must be at least 1")
    try:
        urls = read_urls(args.file, args.format, stdin)
        state = State.load_or_new(args.resume, urls, args.batch_size)
        client = Client(args.api, key, retries=args.retries)
    except (InputError, ValueError) as exc:
        return fail(EXIT_INPUT, str(exc))
    print(f"import: {len(urls.urls)} distinct URLs ({urls.duplicates} duplicates dropped, {urls.skipped} entries "
          f"skipped) in batches of {state.batch_size}", file=sys.stderr)
    if state.done or state.jobs:
        print(f"import: resuming from {args.resume}: {len(state.done)} batches done, {len(state.jobs)} to follow",
              file=sys.stderr)
    failures = FailureLog(args.failures)
    importer = Importer(client, urls.urls, state, in_flight=args.in_flight, on_failed=failures.write)
    progress = Progress(importer, args.progress, args.interval, sys.stderr)
    started = time.monotonic()
    try:
        # Reachable, and the key known, before anything is sent; few retries, so a wrong --api fails fast.
        Client(args.api, key, retries=min(args.retries, PREFLIGHT_RETRIES)).count()
        if urls.urls:
            importer.run(progress)
    except KeyboardInterrupt:
        progress.close()
        submitted, counts = importer.totals()
        print(_summary(submitted, counts, time.monotonic() - started), file=sys.stderr)
        hint = f"; rerun with --resume {args.resume} to continue" if args.resume else \
            " (without --resume, a rerun starts over)"
        return fail(EXIT_INTERRUPTED, "interrupted" + hint)
    except AuthError as exc:
        return fail(EXIT_AUTH, f"the API refused the key: {exc}")
    except ApiUnreachable as exc:
        return fail(EXIT_UNREACHABLE, f"API unreachable: {exc}" + (
            f"; rerun with --resume {args.resume} to continue" if args.resume and state.done else ""))
    except ApiError as exc:
        return fail(EXIT_API, str(exc))
    except ClientError as exc:
        return fail(EXIT_API, str(exc))
    finally:
        progress.close()
    submitted, counts = importer.totals()
    print(_summary(submitted, counts, time.monotonic() - started))
    return EXIT_OK


def _summary(submitted: int, counts: Counts, seconds: float) -> str:
    return (f"{submitted} submitted, {counts.stored} stored, {counts.existed} existed, {counts.failed} failed "
            f"in {seconds:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bulk_import.py", description=DESCRIPTION)
    add_arguments(parser)
    with contextlib.suppress(BrokenPipeError):
        return run(parser.parse_args(argv))
    return EXIT_OK
