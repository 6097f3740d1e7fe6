"""Where an ingest's CPU goes, process by process, beside the limit and the required work.

    .venv/bin/python -m bench.parts --processes 2 --workspace /dev/shm
    .venv/bin/python -m bench.parts --images 3000 --rounds 3 --processes 2

The benchmark (``python -m bench``) gives one figure of CPU per image for casimg; this splits it. Each
round runs the limit (bench.references.plain_fetch), the required work (``required_work_fetch``) and one
casimg ingest, at the same process count, and reads the CPU of each process from /proc before and after:

- casimg's own processes (``casimg serve`` and the servers it forks, the placeholder filler apart);
- its Redis (a redis-server like the embedded one: AOF, everysec);
- the origin (nginx when installed, else the aiohttp origin), for every run alike;
- the placeholder filler, which runs at idle priority, shown apart: it runs on the cycles the others
  leave when they wait, and on 2 cores that was still a part of a saturated machine.

The ms per image of all of them, times the images per second, is the cores they kept busy; beside it, the
whole machine's (/proc/stat), which also holds the kernel's own work (loopback networking in softirq,
kernel threads) and this script's. When the required work keeps every core busy, the share Redis takes
of the same cores caps casimg's ratio to the required work before any of casimg's own Python runs:
required / (required + Redis), printed below the table. Redis's commands per image (``INFO commandstats``
after ``CONFIG RESETSTAT``) follow it.

``--workspace /dev/shm`` takes the disk out (no syncfs wait, no inode allocator), which leaves the CPU.
Only loopback addresses are used. Prints markdown; writes nothing to the repository.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import redis

from bench import log, spread, workspace
from bench.corpus import make_images, set_directory
from bench.ingest import casimg_ingest
from bench.origin import image_urls, serve_image_set
from bench.procs import ROOT, TICK, Popen, Procs, is_filler, own_cpu, tree
from bench.references import reference_run, required_work_fetch
from bench.stack import start_casimg, start_redis

PARTS = ("own", "redis", "origin", "filler")
HEADINGS = {"own": "its own processes", "redis": "Redis", "origin": "the origin",
            "filler": "placeholder filler (idle priority)"}


MACHINE = ("machine", "softirq", "switches", "connections")


def machine_counters() -> dict[str, float]:
    """The whole machine's counters: CPU seconds spent on anything but idling (/proc/stat, every core),
    which holds the processes above and the kernel's own work that no process's figure holds (loopback
    networking in softirq, kernel threads); of it, the softirq seconds; context switches; and TCP
    connections opened (/proc/net/snmp's ActiveOpens: a download or Redis call that opens a connection
    instead of reusing one shows there)."""
    lines = Path("/proc/stat").read_text().splitlines()
    ticks = [int(value) for value in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
    switches = next(int(line.split()[1]) for line in lines if line.startswith("ctxt "))
    tcp = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Tcp:")]
    opens = int(tcp[1][tcp[0].index("ActiveOpens")])
    return {"machine": (sum(ticks) - ticks[3] - ticks[4]) / TICK, "softirq": ticks[6] / TICK,
            "switches": float(switches), "connections": float(opens)}


class Meter:
    """CPU seconds of each part, read at once: the parts are process trees, listed again at each reading
    (a process started meanwhile counts from 0)."""

    def __init__(self, roots: dict[str, list[Popen]]) -> None:
        self.roots = roots

    def read(self) -> dict[str, dict[int, float]]:
        readings: dict[str, dict[int, float]] = {part: {} for part in PARTS}
        readings.update({name: {0: value} for name, value in machine_counters().items()})
        for part, processes in self.roots.items():
            for process in processes:
                for pid in tree(process.pid):
                    where = "filler" if part == "own" and is_filler(pid) else part
                    readings[where][pid] = own_cpu(pid)
        return readings

    @staticmethod
    def spent(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
        return {part: sum(cpu - before[part].get(pid, 0.0) for pid, cpu in after[part].items())
                for part in (*PARTS, *MACHINE)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.parts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="distinct images (default 3000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of limit, required work, casimg (default 2)")
    parser.add_argument("--processes", type=int, default=2, help="processes of each run (default 2)")
    parser.add_argument("--workspace", default=None, help="where the run's temp directory goes (default: TMPDIR)")
    parser.add_argument("--cache", default=str(ROOT / ".bench-cache"), help="where the images are kept")
    args = parser.parse_args()

    cache = set_directory(Path(args.cache), args.images)
    files = make_images(cache, args.images)
    procs = Procs()
    rows: dict[str, list[tuple[float, dict[str, float]]]] = {"limit": [], "required work": [], "casimg": []}
    calls: list[dict[str, tuple[float, float]]] = []  # per round: command -> (calls, µs) per image
    with workspace(False, "casimg-parts-", args.workspace) as work:
        try:
            port, origin = serve_image_set(procs, work, cache)
            origin_processes = list(procs.children)
            urls, _, sizes = image_urls(port, files)
            log(f"origin: {origin}; workspace {work}")
            for round_number in range(args.rounds):
                for name, fetch in (("limit", None), ("required work", required_work_fetch)):
                    meter = Meter({"origin": origin_processes})
                    before = meter.read()
                    result = (reference_run(work, urls, processes=args.processes) if fetch is None else
                              reference_run(work, urls, fetch, processes=args.processes))
                    spent = meter.spent(before, meter.read())
                    spent["own"] = result.cpu_seconds
                    rows[name].append((result.per_second, spent))
                    log(f"round {round_number + 1}, {name}: {result.per_second:.0f} images/s")
                redis_proc, redis_url = start_redis(procs, work / f"redis-{round_number}", persistent=True)
                server = start_casimg(procs, work / f"data-{round_number}", redis_url, processes=args.processes)
                client = redis.Redis.from_url(redis_url, decode_responses=True)
                client.config_resetstat()
                meter = Meter({"own": [server.proc], "redis": [redis_proc], "origin": origin_processes})
                before = meter.read()
                result = casimg_ingest(server, redis_url, urls, sizes)
                spent = meter.spent(before, meter.read())
                stats = client.info("commandstats")
                calls.append({name.removeprefix("cmdstat_"): (entry["calls"] / len(urls), entry["usec"] / len(urls))
                              for name, entry in stats.items()})
                client.close()
                procs.stop(server.proc)
                procs.stop(redis_proc)
                if result.stored != len(urls):
                    raise SystemExit(f"casimg stored {result.stored} of {len(urls)}: {result.failures}")
                rows["casimg"].append((result.per_second, spent))
                log(f"round {round_number + 1}, casimg: {result.per_second:.0f} images/s")
        finally:
            procs.stop_all()
    report(rows, calls, args)


def report(rows: dict[str, list[tuple[float, dict[str, float]]]], calls: list[dict[str, tuple[float, float]]],
           args: argparse.Namespace) -> None:
    images = args.images
    print(f"\n{images:,} images, {args.rounds} round(s), {args.processes} process(es) each, workspace "
          f"{args.workspace or 'TMPDIR'}; CPU in ms per image, each part's range over the rounds\n")
    print("| run | images/s | " + " | ".join(HEADINGS[part] for part in PARTS)
          + " | all of them | cores they kept busy | the machine | of which softirq | cores the machine kept busy"
          " | context switches per image | TCP connections opened per image |")
    print("|---|---|" + "---|" * (len(PARTS) + 7))
    medians: dict[str, dict[str, float]] = {}
    for name, runs in rows.items():
        rates = [rate for rate, _ in runs]
        per_image = {part: [spent[part] / images * 1000 for _, spent in runs] for part in PARTS}
        totals = [sum(spent[part] for part in PARTS) / images * 1000 for _, spent in runs]
        machine = [spent["machine"] / images * 1000 for _, spent in runs]
        softirq = [spent["softirq"] / images * 1000 for _, spent in runs]
        switches = [spent["switches"] / images for _, spent in runs]
        connections = [spent["connections"] / images for _, spent in runs]
        medians[name] = {part: statistics.median(values) for part, values in per_image.items()}
        cells = [spread(values) if any(values) else "" for values in per_image.values()]
        busy = statistics.median(rate * total / 1000 for rate, total in zip(rates, totals, strict=True))
        whole = statistics.median(rate * total / 1000 for rate, total in zip(rates, machine, strict=True))
        print(f"| {name} | {spread(rates, '.0f')} | " + " | ".join(cells)
              + f" | {spread(totals)} | {busy:.2f} | {spread(machine)} | {spread(softirq)} | {whole:.2f}"
              f" | {spread(switches, '.1f')} | {spread(connections)} |")
    required = medians["required work"]["own"] + medians["required work"]["origin"]
    redis_part = medians["casimg"]["redis"]
    print(f"\nRedis beside the required work on the same cores: at most {required:.2f} / ({required:.2f} + "
          f"{redis_part:.2f}) = {required / (required + redis_part):.2f} of the required work's rate, while "
          "the required work keeps every core busy (see the cores the machine kept busy).\n")
    commands = sorted({name for run in calls for name in run}, key=lambda name: -statistics.median(
        run.get(name, (0.0, 0.0))[1] for run in calls))
    print("| Redis command | calls per image | µs per image (a script's include its own commands') |")
    print("|---|---|---|")
    for name in commands:
        count = statistics.median(run.get(name, (0.0, 0.0))[0] for run in calls)
        micros = statistics.median(run.get(name, (0.0, 0.0))[1] for run in calls)
        if count >= 0.005:
            print(f"| {name} | {count:.2f} | {micros:.1f} |")


if __name__ == "__main__":
    main()
