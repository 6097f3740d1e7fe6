"""Per core: casimg, img2dataset and the references each on one CPU, the origin and Redis on the others.

    .venv/bin/python -m bench.per_core --workspace /dev/shm
    .venv/bin/python -m bench.per_core --rounds 4 --casimg-env CASIMG_PLACEHOLDERS=false

`python -m bench` compares the tools on this machine as it is: on 2 cores, the origin, casimg's Redis and
every process of the tool under test share both, and two img2dataset processes of 64 threads each lose
more to that than casimg's two pinned servers do. A larger machine has a core for each process, and its
origins are elsewhere. This measures that shape on a machine of 2 or more CPUs: this process pins itself
to the first CPU, and everything it then starts inherits it (the references run in it; img2dataset with
1 process of 64 threads; `casimg serve --processes 1` with its filler and render pool); the origin and
each casimg's Redis are moved to the other CPUs (bench.procs.confine). Rounds are interleaved, each in
the reverse order of the one before; each casimg has a fresh Redis and data directory.

What it says about a machine of N cores, each tool with N processes (the assumptions): each process does
what it does here, since none shares its core; the origins and the network keep up; and, for casimg,
its one Redis does too. The last is what this run cannot give for free, so it reports Redis's CPU per
image, and how many casimg processes at this rate one Redis core serves. Only loopback addresses are
used. Prints markdown; writes nothing to the repository.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

from bench import env_of, log, spread, workspace
from bench.corpus import make_images, set_directory
from bench.img2dataset_ref import VERSION as IMG2DATASET_VERSION
from bench.img2dataset_ref import ensure_installed, img2dataset_run
from bench.ingest import Series, casimg_run
from bench.origin import CONCURRENCY, image_urls, serve_image_set
from bench.procs import ROOT, Procs, confine
from bench.references import IngestResult, reference_run, required_work_fetch
from casimg import affinity

TARGET = 1.5  # of img2dataset's own figure: the speed issue's target for casimg


def ratios(these: Series, those: Series) -> list[float]:
    return [a / b for a, b in zip(these.rates, those.rates, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.per_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="distinct images (default 3000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--casimg-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for casimg (repeatable)")
    parser.add_argument("--workspace", default=None, help="where the run's temp directory goes (default: TMPDIR)")
    parser.add_argument("--cache", default=str(ROOT / ".bench-cache"), help="where the images are kept")
    args = parser.parse_args()
    env = env_of(parser, args.casimg_env)
    cpus = affinity.usable()
    if len(cpus) < 2:
        parser.error("this needs 2 CPUs or more: one for the run under test, the others for the origin and Redis")
    under_test, others = cpus[0], set(cpus[1:])
    if not affinity.pin(under_test):
        parser.error("this system refused to pin the process")
    cache = set_directory(Path(args.cache), args.images)
    files = make_images(cache, args.images)
    img2dataset = ensure_installed(Path(args.cache))
    casimg_name = "casimg serve --processes 1" + "".join(f", {name}={value}" for name, value in env.items())
    runs = {key: Series(name) for key, name in (
        ("limit", "limit: aiohttp fetch + write"), ("required", "required work: the limit + validation, SHA-256, "
                                                                "syncfs"),
        ("own", f"img2dataset {IMG2DATASET_VERSION}, 1 process x {CONCURRENCY} threads: its own figure"),
        ("wall", "img2dataset, its wall-clock rate and its command's CPU (its start included)"),
        ("casimg", casimg_name))}
    redis_ms: list[float] = []
    procs = Procs()
    with workspace(False, "casimg-per-core-", args.workspace) as work:
        try:
            port, origin = serve_image_set(procs, work, cache)
            for process in procs.children:
                confine(process.pid, others)
            urls, _, sizes = image_urls(port, files)
            log(f"origin: {origin} on CPU {sorted(others)}; the run under test on CPU {under_test}; workspace {work}")

            def img2dataset_round(number: int) -> None:
                done = img2dataset_run(img2dataset, work, urls, 1, CONCURRENCY, f"1-{number}")
                runs["own"].rates.append(done.reported_per_second)  # (its CPU is the whole command's: below)
                runs["wall"].add(IngestResult(done.seconds, done.images, sum(sizes.values()),
                                              cpu_seconds=done.cpu_seconds))

            def casimg_round(number: int) -> None:
                result = casimg_run(procs, work, f"1-{number}", urls, sizes, 1, env=env, redis_cpus=others)
                if result.stored + result.existed != len(urls):
                    sys.exit(f"casimg stored {result.stored} of {len(urls)}; failures: {result.failures}")
                runs["casimg"].add(result)
                redis_ms.append(result.redis_cpu_seconds / result.images * 1000)

            steps = [lambda n: runs["limit"].add(reference_run(work, urls)),
                     lambda n: runs["required"].add(reference_run(work, urls, required_work_fetch)),
                     img2dataset_round, casimg_round]
            log("warming the origin up (untimed)")
            reference_run(work, urls)
            for number in range(args.rounds):
                for step in steps if number % 2 == 0 else steps[::-1]:
                    step(number)
                log(f"round {number + 1} of {args.rounds}: " + "; ".join(
                    f"{key} {series.rates[-1]:.0f}/s" for key, series in runs.items()))
        finally:
            procs.stop_all()
    print(report(args, runs, redis_ms, under_test, others))


def report(args: argparse.Namespace, runs: dict[str, Series], redis_ms: list[float], under_test: int,
           others: set[int]) -> str:
    required, own, casimg = runs["required"], runs["own"], runs["casimg"]
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Python {platform.python_version()}. "
             f"`python -m bench.per_core --images {args.images} --rounds {args.rounds}`, workspace "
             f"{args.workspace or 'TMPDIR'}; the run under test on CPU {under_test}, the origin and Redis on "
             f"{', '.join(map(str, sorted(others)))}. Medians over the rounds (range); ratios round by round.\n",
             "| run, on one CPU | images/s | CPU ms per image | of the required work |", "|---|---|---|---|"]
    for key, series in runs.items():
        against = "" if key in ("limit", "required") else spread(ratios(series, required))
        cpu = spread(series.cpu_ms) if series.cpu_ms else ""
        lines.append(f"| {series.name} | {spread(series.rates, '.0f')} | {cpu} | {against} |")
    redis = statistics.median(redis_ms)
    served = 1000 / (redis * statistics.median(casimg.rates))
    lines += [
        "",
        f"- casimg against img2dataset's own figure: {spread(ratios(casimg, own))}; against its wall-clock "
        f"rate: {spread(ratios(casimg, runs['wall']))}.",
        f"- {TARGET}x img2dataset's own figure is {spread([TARGET * r for r in ratios(own, required)])} of the "
        "required work's rate, on the same CPU.",
        f"- casimg's Redis spent {spread(redis_ms, '.3f')} ms of CPU per image: at casimg's rate, one Redis "
        f"core keeps up with about {served:.0f} casimg processes like this one.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
