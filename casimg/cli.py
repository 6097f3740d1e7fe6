"""The `casimg` command: serve, worker, keys, fsck, stats, migrate-store, import. Each calls the same
services the server uses."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from casimg import importer, runtime
from casimg.config import Settings, describe, load_settings
from casimg.embedded import EmbeddedRedis
from casimg.errors import BadRequest, CasimgError, NotFound
from casimg.fsck import fsck
from casimg.keys import Scope
from casimg.logtext import loggable, loggable_lines
from casimg.migrate_store import migrate_store
from casimg.services import Services, open_services, redis_for
from casimg.stats import collect
from casimg.storage.active import StoreName

EXIT_USAGE = 2
# The width --help is rendered at for docs/cli.md: fixed, so the page does not follow the terminal of
# whoever regenerates it.
REFERENCE_WIDTH = 100


class Formatter(logging.Formatter):
    """logging's Formatter with every record made safe to log (logtext.loggable: control characters
    escaped, credentials in URLs cut out), whoever logged it; and the time of each record formatted once
    per second: the access log writes a line per request, and strftime consults the time zone on every
    call."""

    _second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        record.message = loggable(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for more in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if more:
                line += "\n" + loggable_lines(more)  # indented: no line of it can pass for a record's
        return line

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second, stamp = self._second
        if int(record.created) != second:
            second = int(record.created)
            stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = (second, stamp)  # one assignment: threads that log see a matching pair
        return self.default_msec_format % (stamp, record.msecs)


class JsonFormatter(Formatter):
    """One JSON object a line. The message and every string field are cleaned as in the text format, so
    both formats say the same; json.dumps escapes what is left (non-ASCII)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": self.formatTime(record), "level": record.levelname,
                                 "logger": record.name, "message": loggable(record.getMessage())}
        fields = getattr(record, "fields", None)  # a request or a download outcome, as separate fields
        if isinstance(fields, dict):
            entry.update({name: loggable(value) if isinstance(value, str) else value
                          for name, value in fields.items() if name not in entry})
        if record.exc_info:
            entry["exc"] = loggable_lines(self.formatException(record.exc_info), indent="")
        return json.dumps(entry)


def setup_logging(log_format: str) -> None:
    # Neither format names the calling function, thread or process, so records skip looking them up
    # (the logging HOWTO's "Optimization"; findCaller walks the stack on every record).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML settings file (see config/casimg.example.toml)")
    parser.add_argument("--data-dir", dest="data_dir", help="data directory (default ./data; CASIMG_DATA_DIR)")
    parser.add_argument("--redis-url", dest="redis_url",
                        help="Redis to use; empty: the data dir's embedded Redis (CASIMG_REDIS_URL)")
    parser.add_argument("--log-format", dest="log_format", choices=["text", "json"], help="log line format")


def build_parser() -> argparse.ArgumentParser:
    settings_help = "\n".join(
        f"  {env:<30} {help} (default: {default or 'empty'})" for env, default, help in describe()
    )
    parser = argparse.ArgumentParser(
        prog="casimg",
        description="Content-addressed image download service.",
        epilog="settings (defaults < --config TOML < environment < flags):\n" + settings_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP API (and the download workers)")
    _common(serve)
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 9000)")
    serve.add_argument("--processes", metavar="N|auto",
                       help="processes sharing the port, each with its own download worker (default auto: one per "
                            "core; 1 forks nothing)")
    serve.add_argument("--no-workers", dest="workers", action="store_const", const=False,
                       help="do not download in this process; run `casimg worker` apart")

    worker = commands.add_parser("worker", help="run only download workers, beside a server on the same Redis")
    _common(worker)

    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key; it is printed once, on the last line")
    _common(create)
    create.add_argument("--name", required=True)
    create.add_argument("--scope", required=True, choices=[s.name for s in Scope])
    listing = key_commands.add_parser("list", help="list keys (never their secrets)")
    _common(listing)
    revoke = key_commands.add_parser("revoke", help="revoke a key by name or id")
    _common(revoke)
    revoke.add_argument("name")

    check = commands.add_parser("fsck", help="check index and blobs; exit 1 on problems")
    _common(check)
    check.add_argument("--repair", action="store_true", help="fix what is safe and report what is not")

    stats = commands.add_parser("stats", help="URLs, blobs, bytes on disk, dedup ratio, queue depth, jobs")
    _common(stats)
    stats.add_argument("--json", action="store_true", help="one JSON object instead of lines")

    move = commands.add_parser(
        "migrate-store", help="copy every blob to another store while the service runs, then make it the active one",
        description="Copy every referenced blob to another store, check each copy, and make that store the "
        "active one for every process (docs/storage.md). Safe while servers and workers run; interrupted, "
        "run it again with the same --to and it resumes.")
    _common(move)
    move.add_argument("--to", required=True, metavar="STORE",
                      help="'s3://bucket/prefix' (endpoint and credentials from the CASIMG_S3_* settings) or 'file'")

    bulk = commands.add_parser("import", help="submit a file of URLs to a running server and follow the jobs",
                               description=importer.DESCRIPTION)
    importer.add_arguments(bulk)
    return parser


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """`parser` and every subcommand's parser under it, depth first, in the order they were added."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _parsers(sub)


def cli_reference() -> str:
    """The --help of `casimg` and of each subcommand, as markdown, for docs/cli.md.

    The settings that `casimg --help` lists after the commands are left out: docs/settings.md has them.
    """
    sections = []
    for parser in _parsers(build_parser()):
        parser.epilog = None
        parser.formatter_class = functools.partial(parser.formatter_class, width=REFERENCE_WIDTH)
        sections.append(f"### `{parser.prog}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(sections)


def _settings(args: argparse.Namespace) -> Settings:
    names = ("data_dir", "redis_url", "log_format", "host", "port", "workers", "processes")
    return load_settings(args.config, overrides={n: getattr(args, n, None) for n in names})


def _with_redis(settings: Settings, body: Callable[[Services], Awaitable[int]]) -> int:
    """Run `body(services)` against the configured or embedded Redis, for the short commands."""
    async def run(url: str) -> int:
        services = await open_services(settings, url, with_worker=False, follow_store=False)
        try:
            return await body(services)
        finally:
            await services.close()

    with redis_for(settings, own_data_dir=False) as url:
        return asyncio.run(run(url))


async def _keys(args: argparse.Namespace, services: Services) -> int:
    store = services.api_keys
    if args.keys_command == "create":
        key = await store.create(args.name, Scope[args.scope])
        print(f"created key {args.name!r} with scope {args.scope}; it is shown only now:")
        print(key)
    elif args.keys_command == "list":
        print(f"{'id':<14} {'name':<24} {'scope':<6} created")
        for key in await store.list():
            print(f"{key.id:<14} {key.name:<24} {key.scope.name:<6} {key.created}")
    else:
        key = await store.revoke(args.name)
        print(f"revoked key {key.name!r} ({key.id})")
    return 0


async def _stats(args: argparse.Namespace, services: Services) -> int:
    found = await collect(services.index, services.queue, services.blobs)
    print(json.dumps(found.as_json()) if args.json else "\n".join(found.lines()))
    return 0


async def _fsck(args: argparse.Namespace, services: Services) -> int:
    settings = services.settings
    report = await fsck(services.index, services.blobs, repair=args.repair, tmp_grace=settings.tmp_grace)
    for line in report.repaired:
        print(f"repaired: {line}")
    for line in report.notes:
        print(f"note: {line}")
    for line in report.problems:
        print(f"problem: {line}")
    print(f"fsck: {len(report.problems)} problem(s), {len(report.notes)} note(s)"
          + (f", {len(report.repaired)} repair(s)" if args.repair else ""))
    return 0 if report.ok else 1


async def _migrate_store(args: argparse.Namespace, services: Services) -> int:
    progress = await migrate_store(services.stores, services.index, StoreName.parse(args.to))
    return 1 if progress.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "import":
        return importer.run(args)  # a client of the HTTP API: no settings, no Redis
    try:
        settings = _settings(args)
        setup_logging(settings.log_format)
        if args.command == "serve":
            with redis_for(settings, own_data_dir=True) as url:
                if settings.process_count > 1:
                    return runtime.serve_processes(settings, url)
                runtime.run_loop(runtime.serve(settings, url))
            return 0
        if args.command == "worker":
            if not settings.redis_url and not EmbeddedRedis(settings.data_dir).alive():
                raise CasimgError(f"no Redis: start `casimg serve --data-dir {settings.data_dir}` "
                                  "or pass --redis-url")
            runtime.run_loop(runtime.run_worker(settings, settings.redis_url or EmbeddedRedis(settings.data_dir).url))
            return 0
        if args.command == "keys":
            return _with_redis(settings, lambda services: _keys(args, services))
        if args.command == "stats":
            return _with_redis(settings, lambda services: _stats(args, services))
        if args.command == "migrate-store":
            return _with_redis(settings, lambda services: _migrate_store(args, services))
        return _with_redis(settings, lambda services: _fsck(args, services))
    except (BadRequest, NotFound) as exc:
        print(f"casimg: {exc}", file=sys.stderr)
        return 1
    except CasimgError as exc:
        print(f"casimg: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
