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
from bench.ingest import Ingest, Series
from bench.listing import LIST_URL_LENGTH, ListingRow
from bench.origin import CONCURRENCY, PER_HOST
from bench.retrieval import Retrieval, WrkResult

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


RETRIEVAL_NAMES = {"casimg": "casimg GET /api/image",
                   "bare": "minimal Tornado: one HGET + one file read on the loop, no ETag (floor)",
                   "threaded": "threaded Tornado: the same, read in a thread, Tornado's ETag (the old reference)",
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
    ingest: Ingest
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


def _spread(series: Series, reference: Series | None = None) -> str:
    """The median of a series' rates (or of its ratios to `reference`, round by round) and their range."""
    values = series.rates if reference is None else [a / b for a, b in zip(series.rates, reference.rates, strict=False)]
    if not values:
        return "n/a"
    digits = 0 if reference is None else 2
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def ingest(args: argparse.Namespace, results: Results) -> list[str]:
    run = results.ingest
    series, default = run.series, run.processes
    counts = sorted({int(key.split("@")[1]) for key in series})
    rounds = len(next(iter(series.values())).rates)
    lines = ["## 1-2. Ingest\n",
             f"Creating a file in the run's workspace took {results.create_us:.0f} µs before the ingest "
             "(`file_creation_cost`: each blob is one new file, and most blobs of a fresh store make a "
             "new fan-out directory too).\n",
             f"{rounds} interleaved rounds (each in the reverse order of the one before); images/s is the median "
             "over the rounds with the range, and each ratio the median of the round-by-round ratios with "
             "their range, against the reference with the same process count. The limit is a plain aiohttp "
             "fetch-and-write; the required work is the limit plus what casimg cannot skip for a body: its "
             "validation, a SHA-256 and a shared syncfs before the body counts (`required_work_fetch`; no "
             "index, queue or log); img2dataset runs as bench/img2dataset_ref.py says (no decode, no "
             f"validation, no flush, no index). The default deployment is `casimg serve` with one process "
             f"per core, {default} here.\n",
             "| run | images | images/s | MB/s | CPU ms per image | of the limit | of the required work "
             "| of img2dataset | target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for count in counts:
        limit, required = series[f"limit@{count}"], series[f"required@{count}"]
        i2d = series.get(f"img2dataset@{count}")
        casimg, dup = series[f"casimg@{count}"], series[f"casimg-dup@{count}"]
        for key in ("limit", "required", "img2dataset", "casimg", "casimg-dup"):
            one = series.get(f"{key}@{count}")
            if one is None:
                continue
            name = one.name
            if key == "img2dataset":
                name += f"; its own figure: {_spread(Series('', one.reported))}/s"
            if key.startswith("casimg"):
                name += f" ({one.stored} stored, {one.failed} failed over the rounds)"
            target = ""
            own = Series("", i2d.reported) if i2d is not None else None  # img2dataset's own figures
            if key == "casimg" and count == default and own is not None:
                ratios = [a / b for a, b in zip(casimg.rates, own.rates, strict=False)]
                target = f"of img2dataset's own figure >= 1.5: {verdict(statistics.median(ratios) >= 1.5)}; "
            if key == "casimg":
                ratios = [a / b for a, b in zip(casimg.rates, required.rates, strict=False)]
                target += f"of required >= 0.9: {verdict(statistics.median(ratios) >= 0.9)}"
            if key == "casimg-dup":
                ratios = [a / b for a, b in zip(dup.rates, casimg.rates, strict=False)]
                target = f"{_spread(dup, casimg)} of distinct, >= 1.3: {verdict(statistics.median(ratios) >= 1.3)}"
            cpu = statistics.median(one.cpu_ms) if one.cpu_ms else float("nan")
            cells = [name, f"{one.images:,}", _spread(one), f"{one.median * one.bytes / one.images / 1e6:.1f}",
                     f"{cpu:.2f}",
                     "" if key == "limit" else _spread(one, limit),
                     _spread(one, required) if key in ("casimg", "img2dataset") else "",
                     f"{_spread(one, own)} of its own figure; {_spread(one, i2d)} of its wall-clock rate"
                     if key == "casimg" and i2d is not None and own is not None else "", target]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["",
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
    default_count = results.ingest.processes
    lines = [f"## 3. Retrieval\n\nwrk -t2 -c{args.connections} -d{args.duration}s, {args.repeat} round(s) over all "
             "servers of a process count, each round starting one server later; medians, with the range of the "
             f"round-by-round ratio; {results.retrieval.sample:,} stored images (average {average_kb:.0f} KB), "
             "wrk on the same cores. The minimal handler does one HGET and one file read on the loop, and has "
             "Tornado compute no ETag; the threaded one (the reference of the runs before) reads in a thread "
             "and has Tornado hash every body for an ETag.\n",
             "| server | requests/s | MB/s | p50 ms | p99 ms | errors | ratio | target |",
             "|---|---|---|---|---|---|---|---|"]
    for name, result in measured.items():
        kind, count = name.split("@")
        default = f"casimg@{count}" if int(count) == default_count else ""
        label = f"{RETRIEVAL_NAMES[kind]}, {count} process(es)" + (" (default deployment)" if name == default else "")
        text, target = "", ""
        if kind == "casimg" and f"bare@{count}" in measured:
            text = (f"{_rounds_ratio(result, measured[f'bare@{count}'])} of minimal; "
                    f"{_rounds_ratio(result, measured[f'threaded@{count}'])} of threaded")
            target = f">= 0.9 of minimal: {verdict(result.rps >= 0.9 * measured[f'bare@{count}'].rps)}"
        elif kind in ("nginx", "front") and f"casimg@{count}" in measured:
            text = f"{ratio(result.rps, measured[f'casimg@{count}'].rps)}x casimg"
            if kind == "front":
                target = f">= 2x: {verdict(result.rps >= 2 * measured[f'casimg@{count}'].rps)}"
        lines.append(f"| {label} | {result.rps:,.0f} | {result.mb_per_second:,.0f} | "
                     f"{result.p50_ms:.2f} | {result.p99_ms:.2f} | {result.errors} | {text} | {target} |")
    lines.append("")
    return lines


def _rounds_ratio(result: WrkResult, reference: WrkResult) -> str:
    ratios = [a / b for a, b in zip(result.rounds, reference.rounds, strict=False)]
    return f"{result.rps / reference.rps:.2f} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "n/a"


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
    run = results.ingest
    lines.append(f"- casimg service RSS after ingesting {len(results.files):,} images: {run.rss_kib / 1024:.0f} MiB "
                 f"({run.rss_start_kib / 1024:.0f} MiB at start).")
    failed = [one for one in run.series.values() if one.failed]
    notes = [f"ingest, {one.name}: {one.failed} URL(s) failed, e.g. {one.failures[:2]}" for one in failed]
    lines += [f"- Note: {note}" for note in [*notes, *results.retrieval.notes]]
    return lines
