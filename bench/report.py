"""The run's markdown: what ran where, each scenario's table beside its references, and the verdicts
against casimg's targets. It is printed and written into BENCHMARKS.md between ``BEGIN`` and ``END``;
the hand-written sections around them (readings, other measurements) stay as they are."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench.corpus import EXT
from bench.ingest import Distinct
from bench.listing import LIST_URL_LENGTH, ListingRow
from bench.origin import CONCURRENCY, PER_HOST
from bench.references import IngestResult
from bench.retrieval import Retrieval

BEGIN = "<!-- bench: the tables below are written by `python -m bench`; edit outside them -->"
END = "<!-- bench: end of the generated tables -->"


def splice(document: str, table: str) -> str:
    """`document` with its generated part replaced by `table`; a document without one gets it on top."""
    generated = f"{BEGIN}\n{table.strip()}\n{END}\n"
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        return generated + ("\n" + document if document.strip() else "")
    rest = document[end + len(END):].lstrip("\n")
    return document[:start] + generated + ("\n" + rest if rest else "")


RETRIEVAL_NAMES = {"casimg": "casimg GET /api/image", "bare": "bare Tornado: one HGET + one file read (floor)",
                   "nginx": "nginx static, same blob files (physical limit)",
                   "front": "nginx front: casimg X-Accel-Redirect + nginx sendfile"}


@dataclass
class Results:
    """Everything one run measured, and the state of the machine around it."""

    started_at: datetime
    load_before: float
    load_after: float
    files: list[tuple[str, int]]
    origin_kind: str
    create_us: float
    validation: list[tuple[str, ...]]
    distinct: Distinct
    duplicates: tuple[IngestResult, IngestResult]  # the limit, casimg
    retrieval: Retrieval
    listing: list[ListingRow]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def verdict(ok: bool) -> str:
    return "holds" if ok else "**misses**"


def platform_line() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, Python {sys.version.split()[0]}" if model else f"Python {sys.version.split()[0]}"


def render(args: argparse.Namespace, results: Results) -> str:
    return "\n".join([*header(args, results), *ingest(args, results), *retrieval(args, results),
                      *listing(results)]) + "\n"


def header(args: argparse.Namespace, results: Results) -> list[str]:
    files = results.files
    formats = {fmt: sum(1 for name, _ in files if name.endswith(ext)) for fmt, ext in EXT.items()}
    return [f"# casimg benchmarks\n\nRun {results.started_at:%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores "
            f"({platform_line()}); load average {results.load_before:.2f} before, {results.load_after:.2f} after. "
            f"`python -m bench {' '.join(sys.argv[1:])}`. casimg processes: {args.processes}.\n",
            f"Image set: {len(files):,} distinct images, {sum(size for _, size in files) / 1e6:.0f} MB "
            f"({formats['JPEG']} JPEG, {formats['PNG']} PNG, {formats['WEBP']} WebP, "
            f"{min(s for _, s in files) // 1024}-{max(s for _, s in files) // 1024} KB); "
            f"origin: {results.origin_kind} on 8 loopback addresses; concurrency {CONCURRENCY} "
            f"({PER_HOST} per host).\n"]


def _ingest_row(name: str, result: IngestResult, reference: IngestResult, required: IngestResult | None = None,
                target: bool = False) -> str:
    cells = [name, f"{result.images:,}", f"{result.per_second:.0f}", f"{result.mb_per_second:.1f}",
             f"{result.seconds:.1f}", "" if result is reference else ratio(result.per_second, reference.per_second),
             "" if required is None else ratio(result.per_second, required.per_second),
             f">= 0.7: {verdict(result.per_second >= 0.7 * reference.per_second)}" if target else ""]
    return "| " + " | ".join(cells) + " |"


def ingest(args: argparse.Namespace, results: Results) -> list[str]:
    run, (limit_dup, ingest_dup) = results.distinct, results.duplicates
    limit, required = run.limit, run.required_work
    lines = ["## 1-2. Ingest\n",
             f"Creating a file in the run's workspace took {results.create_us:.0f} µs before the ingest "
             "(`file_creation_cost`: each blob is one new file, and most blobs of a fresh store make a "
             "new fan-out directory too).\n",
             "The required work is the limit plus what casimg cannot skip for a body: its validation, a "
             "SHA-256 and a shared syncfs before the body counts (`required_work_fetch`; no index, queue "
             "or log). Its ratio to the limit is the most one casimg process can reach on this stack and "
             "machine; casimg's ratio to it is casimg's own overhead.\n",
             "| run | images | images/s | MB/s | seconds | of the limit | of the required work | target |",
             "|---|---|---|---|---|---|---|---|",
             _ingest_row(f"limit: aiohttp fetch + write, distinct (runs: {'/s, '.join(limit.failures)}/s)",
                         limit, limit),
             _ingest_row(f"required work: the limit + validation, SHA-256, syncfs (runs: "
                         f"{'/s, '.join(required.failures)}/s)", required, limit),
             _ingest_row(f"casimg, distinct ({run.casimg.stored} stored, {run.casimg.failed} failed)", run.casimg,
                         limit, required, target=True)]
    if run.multi is not None:
        lines.append(_ingest_row(f"casimg --processes {args.multi}, distinct ({run.multi.stored} stored, "
                                 f"{run.multi.failed} failed)", run.multi, limit, required, target=True))
    lines += [_ingest_row(f"limit, half duplicates (runs: {'/s, '.join(limit_dup.failures)}/s)", limit_dup,
                          limit_dup),
              _ingest_row(f"casimg, half duplicates ({ingest_dup.stored} stored, {ingest_dup.failed} failed)",
                          ingest_dup, limit_dup),
              "",
              "Validation cost per image, in-process on one core, ms (what the ingest pays per image in "
              "worker threads; `CASIMG_VALIDATION` picks the mode):\n",
              "| format | images | full decode (load) | casimg `decode` (JPEG at 1/8 scale) | "
              "casimg `structure` (default) |",
              "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in results.validation]
    lines.append("")
    return lines


def retrieval(args: argparse.Namespace, results: Results) -> list[str]:
    measured = results.retrieval.results
    if not measured:
        return []
    average_kb = statistics.mean(size for _, size in results.files) / 1024
    lines = [f"## 3. Retrieval\n\nwrk -t2 -c{args.connections} -d{args.duration}s, {args.repeat} round(s) "
             "over all servers of a process count, averaged; "
             f"{results.retrieval.sample:,} stored images (average {average_kb:.0f} KB), "
             f"every server with {args.processes} process(es), wrk on the same cores.\n",
             "| server | requests/s | MB/s | p50 ms | p99 ms | errors | ratio | target |",
             "|---|---|---|---|---|---|---|---|"]
    default = f"casimg@{args.processes}"
    for name, result in measured.items():
        kind, count = name.split("@")
        label = f"{RETRIEVAL_NAMES[kind]}, {count} process(es)" + (" (default deployment)" if name == default else "")
        text, target = "", ""
        if kind == "casimg" and f"bare@{count}" in measured:
            text = f"{ratio(result.rps, measured[f'bare@{count}'].rps)} of bare"
            if name == default:
                target = f">= 0.9: {verdict(result.rps >= 0.9 * measured[f'bare@{count}'].rps)}"
        elif kind in ("nginx", "front"):
            text = f"{ratio(result.rps, measured[default].rps)}x default"
            if kind == "front":
                target = f">= 2x: {verdict(result.rps >= 2 * measured[default].rps)}"
        lines.append(f"| {label} | {result.rps:,.0f} | {result.mb_per_second:,.0f} | "
                     f"{result.p50_ms:.2f} | {result.p99_ms:.2f} | {result.errors} | {text} | {target} |")
    lines.append("")
    return lines


INDEX_BUDGET = 450  # bytes per URL at 1,000,000 URLs: the index, both listing orders and the placeholders


def listing(results: Results) -> list[str]:
    lines = ["## 4-5. Listing and memory\n",
             "Redis filled through `Index.store` (one digest and metadata per URL, URLs of "
             f"{LIST_URL_LENGTH} characters), read over HTTP on one kept-alive connection (beside it, the first "
             "page with a new connection for each request, as earlier runs measured it).\n",
             "| indexed URLs | first page (limit 100) p50 ms | the same, a new connection each | "
             "first page limit=1000 p50 ms | full walk limit=1000 s | walk µs per URL | Redis bytes per URL | "
             "of which url / blob buckets / newest-first order, and the count hash in bytes (MEMORY USAGE) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results.listing:
        parts, times = row.breakdown, row.times
        split = f"{parts['url']:.0f} / {parts['blob']:.0f} / {parts.get('recent', 0):.0f}, {parts['count']:.0f} B"
        lines.append(f"| {row.size:,} | {times.first_ms:.2f} | {times.first_new_connection_ms:.2f} | "
                     f"{times.first_1000_ms:.1f} | {times.walk_seconds:.1f} | "
                     f"{times.walk_seconds / row.size * 1e6:.1f} | {row.per_url:.0f} | {split} |")
    if results.listing:
        last = results.listing[-1]
        lines.append("")
        lines.append(f"- First page under 5 ms at {last.size:,}: {verdict(last.times.first_ms < 5)} "
                     f"({last.times.first_ms:.2f} ms over a kept-alive connection; "
                     f"{last.times.first_new_connection_ms:.2f} ms with a new one each).")
        if len(results.listing) > 1:
            small = results.listing[0]
            growth = (last.times.walk_seconds / small.times.walk_seconds) / (last.size / small.size)
            lines.append(f"- Walk growth against linear ({small.size:,} -> {last.size:,}): {growth:.2f} "
                         f"(1.00 is linear): {verdict(growth < 1.3)}.")
        # The budget of the whole index, placeholders of ~40 bytes a content (bench.index_parts) left out here.
        lines.append(f"- Redis bytes per URL under {INDEX_BUDGET} with placeholders' 40: "
                     f"{verdict(last.per_url + 40 < INDEX_BUDGET)} ({last.per_url:.0f}).")
    run = results.distinct
    lines.append(f"- casimg service RSS after ingesting {len(results.files):,} images: {run.rss_kib / 1024:.0f} MiB "
                 f"({run.rss_start_kib / 1024:.0f} MiB at start).")
    notes = [f"ingest: {run.casimg.failed} URL(s) failed, e.g. {run.casimg.failures[:2]}"] if run.casimg.failed else []
    lines += [f"- Note: {note}" for note in [*notes, *results.retrieval.notes]]
    return lines
