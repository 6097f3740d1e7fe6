"""img2dataset as a reference for the ingest: the tool people importing URL lists would otherwise use.

The benchmark installs it itself, from PyPI, into a virtual environment of its own under the cache
directory (``.bench-cache/img2dataset-<version>/``; it pins dependencies casimg does not want, and its
numpy/opencv stack is large), once, and runs it as its users would on the same URL list, origin,
concurrency and process count as casimg: ``--processes_count P --thread_count C/P``, one shard per
process, ``--output_format files``, no resizing and no re-encoding (``--disable_all_reencoding``), so it
does not decode or validate a body. It keeps its defaults otherwise: a SHA-256 per image, no retries,
a 10 s timeout. Its bytes are written as files, with no flush and no index.

Two figures per run: the wall time of the whole command (start-up, the process pool, the shard files,
the write-out, what a user waits for), and the rate img2dataset reports itself in its last "total"
line (images over the span from the first shard's start to the last shard's end).
"""

from __future__ import annotations

import math
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import log

VERSION = "1.47.0"  # the release measured; a new one gets a new environment
TOTAL_LINE = re.compile(r"^total\s+- success: ([\d.]+) .*images per sec: (\d+) - count: (\d+)", re.M)


@dataclass
class Img2datasetResult:
    seconds: float  # wall time of the command
    images: int
    reported_per_second: float  # img2dataset's own figure
    success: float  # its success ratio
    cpu_seconds: float  # of img2dataset and the processes it waited for (its pool)

    @property
    def per_second(self) -> float:
        return self.images / self.seconds


def ensure_installed(cache: Path) -> Path:
    """The img2dataset command of a venv under `cache`, created and installed from PyPI on first use (a
    marker file says the install finished; an interrupted one is started again)."""
    venv = cache / f"img2dataset-{VERSION}"
    done = venv / "installed"
    if not done.exists():
        log(f"installing img2dataset {VERSION} from PyPI into {venv} (once)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                        f"img2dataset=={VERSION}"], check=True)
        done.write_text(VERSION + "\n")
    return venv / "bin" / "img2dataset"


def img2dataset_run(command: Path, work: Path, urls: list[str], processes: int, concurrency: int,
                    label: str) -> Img2datasetResult:
    """One img2dataset run over `urls` with `processes` x `concurrency / processes` threads."""
    run_dir = work / f"img2dataset-{label}"
    run_dir.mkdir()
    url_list = run_dir / "urls.txt"
    url_list.write_text("\n".join(urls) + "\n")
    args = [str(command), "--url_list", str(url_list), "--input_format", "txt",
            "--output_folder", str(run_dir / "out"), "--output_format", "files",
            "--processes_count", str(processes), "--thread_count", str(concurrency // processes),
            "--number_sample_per_shard", str(math.ceil(len(urls) / processes)),
            "--resize_mode", "no", "--disable_all_reencoding", "True", "--enable_wandb", "False"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONWARNINGS": "ignore"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=run_dir, check=False)
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    (run_dir / "output.log").write_text(done.stdout + done.stderr)
    totals = TOTAL_LINE.findall(done.stdout)
    if done.returncode != 0 or not totals:
        sys.exit(f"img2dataset failed (status {done.returncode}); see {run_dir / 'output.log'}")
    success, rate, count = totals[-1]
    os.sync()  # as after the other references: its dirty pages are not left for the next run's flushes
    return Img2datasetResult(seconds, int(count), float(rate), float(success), cpu)
