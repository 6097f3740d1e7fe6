"""The gallery in a real browser: Chromium driven by Playwright against a real `casimg serve` (its own
redis-server) and the real test origin.

One browser for the module; each test gets a fresh page (its own sessionStorage), which fails the test
on any console error or Content-Security-Policy violation it did not expect. Screenshots of the grid,
the detail view and the submit view, at desktop and phone size, go to test-artifacts/gallery/;
CASIMG_UPDATE_SCREENSHOTS=1 also writes them, reduced to a small palette, to docs/img/.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis.asyncio as aioredis
from PIL import Image

from bench.procs import ROOT
from casimg.index import BlobMeta, Index
from casimg.keys import KeyStore, Scope
from casimg.placeholder import placeholder
from casimg.schema import KeySpace
from tests.origin import Origin
from tests.procs import Processes, Server, image_urls

CHROMIUM = os.environ.get("CASIMG_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (as root: apt-get install chromium; .ci/run does it)",
                allow_module_level=True)

from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright  # noqa: E402

ARTIFACTS = ROOT / "test-artifacts" / "gallery"
DOCS_IMG = ROOT / "docs" / "img"
AXE = Path(__file__).parent / "vendor" / "axe.min.js"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
THUMB_PRESET = "thumb=w:256 h:256 fit:inside format:auto"
PREFIX = "casimg:"
WAIT_MS = 30_000  # generous: the machine is shared with other test runs


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield launched
        launched.close()


class Gallery:
    """One `casimg serve` with some images, its admin key and a read key."""

    def __init__(self, server: Server, origin: Origin) -> None:
        self.server = server
        self.origin = origin
        self.read_key = run(_create_key(server.data_dir, "reader", Scope.read))

    @property
    def base(self) -> str:
        return self.server.base

    def openapi(self) -> dict[str, Any]:
        status, body, _ = self.server.call("GET", "/openapi.json")
        assert status == 200
        return json.loads(body)

    def listing(self, **query: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        path = "/api/images?limit=1000&" + "&".join(f"{k}={quote(v)}" for k, v in query.items())
        while path:
            status, body, headers = self.server.call("GET", path)
            assert status == 200, body
            rows += json.loads(body)
            link = re.match(r"<\?([^>]*)>", headers.get("Link", ""))
            path = f"/api/images?{link.group(1)}" if link else ""
        return rows


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gallery]:
    processes = Processes()
    with Origin() as origin:
        try:
            server = processes.server(tmp_path_factory.mktemp("gallery") / "data",
                                      env={"CASIMG_VARIANT_PRESETS": THUMB_PRESET})
            yield Gallery(server, origin)
        finally:
            processes.cleanup()


def run(coroutine: Any) -> Any:
    """Run a coroutine to its end from a test: in a thread, as Playwright's own loop runs in this one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _client(data_dir: Path) -> aioredis.Redis:
    return aioredis.Redis(unix_socket_path=str(data_dir / "redis" / "redis.sock"), decode_responses=True)


async def _create_key(data_dir: Path, name: str, scope: Scope) -> str:
    client = _client(data_dir)
    try:
        key = await KeyStore(client, KeySpace(PREFIX)).create(name, scope)
    finally:
        await client.aclose()
    assert key is not None
    return key


async def _revoke_key(data_dir: Path, name: str) -> None:
    client = _client(data_dir)
    try:
        await KeyStore(client, KeySpace(PREFIX)).revoke(name)
    finally:
        await client.aclose()


async def _index_copies(data_dir: Path, rows: list[tuple[str, str, BlobMeta]]) -> None:
    """Index URLs for stored contents with casimg's own index code, as a download would (no job)."""
    client = _client(data_dir)
    index = Index(client, KeySpace(PREFIX))
    try:
        for start in range(0, len(rows), 10_000):
            await asyncio.gather(*(index.store(url, d, meta) for url, d, meta in rows[start:start + 10_000]))
    finally:
        await client.aclose()


def index_copies(gallery: Gallery, stem: str, count: int) -> list[str]:
    """`count` more URLs (https://copies.example/<stem>/N.jpg) sharing the bytes of a few stored images."""
    sources = [row for row in gallery.listing() if "/img/" in row["url"]][:8]
    assert sources, "store some images first"
    urls = [f"https://copies.example/{stem}/{n}.jpg" for n in range(count)]
    rows = [(url, sources[n % len(sources)]["sha256"],
             BlobMeta(sources[n % len(sources)]["size"], sources[n % len(sources)]["content_type"],
                      sources[n % len(sources)]["width"], sources[n % len(sources)]["height"]))
            for n, url in enumerate(urls)]
    run(_index_copies(gallery.server.data_dir, rows))
    return urls


@pytest.fixture
def page(browser: Browser, gallery: Gallery) -> Iterator[Page]:
    """A fresh page at desktop size that records console errors and CSP violations; the test fails on
    any it did not list in page.expected (substrings)."""
    context = browser.new_context(viewport=DESKTOP)
    new = context.new_page()
    problems: list[str] = []
    new.expected = []  # type: ignore[attr-defined]

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(f"console: {message.text} ({message.location.get('url', '')})")

    new.on("console", on_console)
    new.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    new.add_init_script("addEventListener('securitypolicyviolation', (e) => console.error("
                        "'CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI))")
    yield new
    context.close()
    unexpected = [p for p in problems if not any(text in p for text in new.expected)]  # type: ignore[attr-defined]
    assert not unexpected, unexpected


def open_gallery(page: Page, gallery: Gallery, key: str | None = None) -> None:
    page.goto(gallery.base + "/")
    page.get_by_label("API key").fill(key or gallery.server.key)
    page.get_by_role("button", name="Open gallery").click()
    expect(page.locator("#gallery")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#total")).to_contain_text("image", timeout=WAIT_MS)


def tiles(page: Page) -> Any:
    return page.locator("#grid .tile:not([hidden]) img[alt]:not([alt=''])")


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    if os.environ.get("CASIMG_UPDATE_SCREENSHOTS"):
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        picture = Image.open(path).convert("RGB")
        small = picture.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        out = io.BytesIO()
        small.save(out, "PNG", optimize=True)
        (DOCS_IMG / f"gallery-{name}.png").write_bytes(out.getvalue())


@pytest.fixture(scope="module")
def stored(gallery: Gallery) -> list[str]:
    """Twelve images from the origin, stored one job at a time so their times differ, then two URLs with
    the same bytes (/dup/...)."""
    urls = image_urls(gallery.origin, 12)
    for url in urls:
        gallery.server.submit([url])
    gallery.server.submit([gallery.origin.url("/dup/first.jpg"), gallery.origin.url("/dup/second.jpg")])
    return urls


# -- in the browser ---------------------------------------------------------------------------------------

# Before the wrong-key test: past CASIMG_AUTH_FAILURE_LIMIT 401s a minute, a bad key is a 429.
def test_a_key_revoked_mid_session_asks_for_a_key_again(page: Page, gallery: Gallery, stored: list[str]) -> None:
    page.expected += ["status of 401"]  # type: ignore[attr-defined]
    key = run(_create_key(gallery.server.data_dir, "short-lived", Scope.read))
    open_gallery(page, gallery, key=key)
    run(_revoke_key(gallery.server.data_dir, "short-lived"))
    # The server caches a key for CASIMG_KEY_CACHE_TTL (2 s): a call after that is refused. Each input in
    # the filters lists again, until one is.
    deadline = time.monotonic() + WAIT_MS / 1000
    while not page.locator("#key-error").is_visible():
        assert time.monotonic() < deadline, "the revoked key was never refused"
        page.locator("#filters").dispatch_event("input")
        page.wait_for_timeout(500)
    expect(page.locator("#key-error")).to_contain_text("not known or was revoked")
    expect(page.locator("#gallery")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('casimg.key')") is None


def test_key_entry_wrong_key_and_session_storage(page: Page, gallery: Gallery, stored: list[str]) -> None:
    page.expected += ["status of 401", "status of 429"]  # type: ignore[attr-defined]
    wrong = "casimg_000000000000_not-a-key-at-all-000000"
    page.goto(gallery.base + "/")
    page.get_by_label("API key").fill(wrong)
    page.get_by_role("button", name="Open gallery").click()
    expect(page.locator("#key-error")).to_contain_text("not known or was revoked", timeout=WAIT_MS)
    assert page.evaluate("sessionStorage.getItem('casimg.key')") is None
    # Past CASIMG_AUTH_FAILURE_LIMIT failures from one address, a bad key is a 429: the page says to wait.
    while gallery.server.call("GET", "/api/key", key=wrong)[0] != 429:
        pass
    page.get_by_role("button", name="Open gallery").click()
    expect(page.locator("#key-error")).to_contain_text(re.compile(r"Too many requests: .* wait \d+ seconds"),
                                                       timeout=WAIT_MS)
    page.get_by_label("API key").fill(gallery.server.key)
    page.get_by_role("button", name="Open gallery").click()
    expect(tiles(page).first).to_be_visible(timeout=WAIT_MS)
    assert page.evaluate("sessionStorage.getItem('casimg.key')") == gallery.server.key
    assert page.context.cookies() == []
    assert gallery.server.key not in page.url
    page.reload()  # the key is kept for the tab: no second prompt
    expect(tiles(page).first).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#key-form")).to_be_hidden()


def test_newest_first(page: Page, gallery: Gallery, stored: list[str]) -> None:
    newest = gallery.origin.url("/img/50.jpg")
    gallery.server.submit([newest])
    open_gallery(page, gallery)
    expect(tiles(page).first).to_have_attribute("alt", re.compile(r"^50\.jpg from"))
    expect(page.get_by_label("Order")).to_have_value("recent")
    page.get_by_label("Order").select_option("")  # the index's order: by the SHA-1 of the URL
    first_by_sha1 = gallery.listing()[0]["url"].rsplit("/", 1)[1]
    expect(tiles(page).first).to_have_attribute("alt", re.compile("^" + re.escape(first_by_sha1)), timeout=WAIT_MS)


def test_filters_by_substring_and_host(page: Page, gallery: Gallery, stored: list[str]) -> None:
    offered = {param["name"] for param in gallery.openapi()["paths"]["/api/images"]["get"]["parameters"]}
    if not {"contains", "host"} <= offered:
        pytest.skip("this casimg lists no contains= or host= filter yet (the page hides its search)")
    open_gallery(page, gallery)
    page.get_by_label("URL contains").fill("/img/11.jpg")
    expect(tiles(page)).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator("#total")).to_have_text("1 image matches")
    page.get_by_label("URL contains").fill("")
    page.get_by_label("Host").fill("no-such-host.example")
    expect(page.locator("#empty")).to_be_visible(timeout=WAIT_MS)
    page.get_by_label("Host").fill(f"127.0.0.1:{gallery.origin.port}")  # the port is not part of the host
    origin_rows = [row for row in gallery.listing() if row["url"].startswith(gallery.origin.url("/"))]
    expect(page.locator("#total")).to_have_text(f"{len(origin_rows)} images match", timeout=WAIT_MS)


def test_detail_view_shared_urls_and_escape(page: Page, gallery: Gallery, stored: list[str]) -> None:
    open_gallery(page, gallery)
    tile = page.get_by_role("button", name=re.compile("^first.jpg from"))
    tile.click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#detail-shared")).to_have_text("2 (this one and 1 more)", timeout=WAIT_MS)
    expect(page.locator("#detail-shared-list")).to_contain_text(gallery.origin.url("/dup/second.jpg"))
    expect(page.locator("#detail-url")).to_have_text(gallery.origin.url("/dup/first.jpg"))
    expect(page.locator("#detail-digest")).to_have_text(re.compile("^[0-9a-f]{64}$"))
    expect(page.locator("#detail-type")).to_have_text("image/jpeg")
    expect(page.locator("#detail-img")).to_have_attribute("src", re.compile("^blob:"), timeout=WAIT_MS)
    expect(page.locator("#detail-download")).to_have_attribute("href", re.compile("^blob:"))
    expect(page.locator("#delete")).to_be_visible()
    screenshot(page, "detail-desktop")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gallery.base)
    page.get_by_role("button", name="Copy URL").click()
    expect(page.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == gallery.origin.url("/dup/first.jpg")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(tile).to_be_focused()  # focus returns to the tile that opened it


def test_delete_with_confirmation_updates_the_grid(page: Page, gallery: Gallery, stored: list[str]) -> None:
    victim = gallery.origin.url("/img/3.jpg")
    open_gallery(page, gallery)
    before = page.locator("#total").inner_text()
    page.get_by_role("button", name=re.compile(r"^3\.jpg from")).click()
    page.get_by_role("button", name="Delete…").click()
    expect(page.locator("#confirm")).to_be_visible()
    page.get_by_role("button", name="Delete", exact=True).click()
    expect(page.get_by_role("dialog")).to_be_hidden(timeout=WAIT_MS)
    expect(page.get_by_role("button", name=re.compile(r"^3\.jpg from"))).to_have_count(0)
    expect(page.locator("#total")).not_to_have_text(before)
    assert gallery.server.call("GET", f"/api/image?url={quote(victim, safe='')}")[0] == 404
    gallery.server.submit([victim])  # as it was, for the other tests


def test_submit_shows_live_progress_and_failures(page: Page, gallery: Gallery, stored: list[str]) -> None:
    origin = gallery.origin
    good = [origin.url(f"/img/{n}.png?delay=0.4") for n in range(100, 106)]
    bad = [origin.url("/status/404"), origin.url("/html")]
    open_gallery(page, gallery)
    page.get_by_role("button", name="Add images").click()
    expect(page.get_by_role("dialog")).to_be_visible()
    # A CSV file: every http(s) field of each line counts, the rest (a header, names) does not.
    csv = "name,url\n" + "".join(f"n{n},{url}\n" for n, url in enumerate(good[:2]))
    page.get_by_label("Or choose a text or CSV file").set_input_files(
        files=[{"name": "urls.csv", "mimeType": "text/csv", "buffer": csv.encode()}])
    expect(page.get_by_label("Image URLs, one per line")).to_have_value("\n".join(good[:2]))
    page.get_by_label("Image URLs, one per line").fill("\n".join(good + bad))
    page.get_by_role("button", name="Submit").click()
    progress = page.locator("#progress-text")
    expect(progress).to_contain_text("Working", timeout=WAIT_MS)  # seen before the job is done
    expect(progress).to_contain_text("Done: 8 of 8. Stored 6, existed 0, failed 2.", timeout=WAIT_MS)
    screenshot(page, "submit-desktop")
    failures = page.locator("#failures li")
    expect(failures).to_have_count(2)
    expect(failures.filter(has_text="/status/404")).to_contain_text("404")
    expect(failures.filter(has_text="/html")).to_have_count(1)
    page.get_by_role("button", name="Close").click()
    expect(page.get_by_role("button", name=re.compile(r"^105\.png from"))).to_be_visible(timeout=WAIT_MS)


def test_read_key_sees_no_write_controls(page: Page, gallery: Gallery, stored: list[str]) -> None:
    open_gallery(page, gallery, key=gallery.read_key)
    expect(page.get_by_role("button", name="Add images")).to_be_hidden()
    expect(tiles(page).first).to_be_visible(timeout=WAIT_MS)
    page.locator("#grid .tile:not([hidden])").first.focus()  # from the keyboard: Enter opens a tile
    page.keyboard.press("Enter")
    expect(page.get_by_role("dialog")).to_be_visible()
    expect(page.locator("#delete")).to_be_hidden()
    expect(page.locator("#detail-digest")).to_have_text(re.compile("^[0-9a-f]{64}$"))


def test_grid_follows_pages_and_recycles_tiles(page: Page, gallery: Gallery, stored: list[str]) -> None:
    index_copies(gallery, "pages", 1500)  # three pages of the gallery's 500
    open_gallery(page, gallery)
    total = int(page.locator("#total").inner_text().split()[0].replace(",", ""))
    assert total >= 1500
    page.keyboard.press("End")
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    last = gallery.listing(order="recent")[-1]["url"]
    expect(page.get_by_role("button", name=re.compile("^" + re.escape(last.rsplit("/", 1)[1]))).first) \
        .to_be_visible(timeout=WAIT_MS)
    # Only the tiles near the viewport exist, not one per image.
    assert page.locator("#grid .tile").count() < 200


def test_placeholders_from_casimg_decode_in_the_page(page: Page, gallery: Gallery, stored: list[str]) -> None:
    """casimg's ThumbHash encoder (casimg/placeholder.py) and the page's vendored decoder agree: the blurred
    picture has the image's aspect ratio and, at the pixel casimg puts its own colour, about that colour."""
    open_gallery(page, gallery)
    picture = Image.new("RGB", (60, 30), (200, 40, 30))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    hashed = placeholder(buffer.getvalue())
    version = re.search(r"/ui/([0-9a-f]+)/", page.content())
    assert version
    decoded = page.evaluate("""async ([version, hashed]) => {
        const { placeholderUrl } = await import(`/ui/${version}/images.js`);
        const url = placeholderUrl({ placeholder: hashed });
        const img = new Image();
        img.src = url;
        await img.decode();
        const canvas = document.createElement("canvas");
        canvas.width = img.width;
        canvas.height = img.height;
        const context = canvas.getContext("2d");
        context.drawImage(img, 0, 0);
        const middle = context.getImageData(img.width >> 1, img.height >> 1, 1, 1).data;
        return { url: url.slice(0, 22), width: img.width, height: img.height, rgb: [...middle.slice(0, 3)] };
    }""", [version.group(1), hashed])
    assert decoded["url"] == "data:image/png;base64,"
    assert 1.6 < decoded["width"] / decoded["height"] < 2.4, decoded
    assert all(abs(got - want) < 40 for got, want in zip(decoded["rgb"], (200, 40, 30), strict=True)), decoded
    assert placeholder_url_is_null_safe(page, version.group(1))


def placeholder_url_is_null_safe(page: Page, version: str) -> bool:
    """A row without a placeholder (null, as before placeholders existed) gives no data: URL."""
    return page.evaluate("""async (version) => {
        const { placeholderUrl } = await import(`/ui/${version}/images.js`);
        return placeholderUrl({ placeholder: null }) === null && placeholderUrl({}) === null;
    }""", version)


def test_tiles_use_the_thumb_variant(page: Page, gallery: Gallery, stored: list[str]) -> None:
    digest = gallery.listing()[0]["sha256"]
    status, _, headers = gallery.server.call("HEAD", f"/api/blobs/{digest}?variant=thumb")
    assert status == 200 and {k.lower(): v for k, v in headers.items()}["etag"] != f'"{digest}"', \
        "?variant=thumb gave the original, not the preset's thumbnail"
    thumbs: list[tuple[int, str]] = []
    page.on("response", lambda r: thumbs.append((r.status, r.headers.get("etag", "")))
            if "variant=thumb" in r.url else None)
    open_gallery(page, gallery)
    expect(tiles(page).first).to_have_attribute("src", re.compile("^blob:"), timeout=WAIT_MS)
    assert thumbs and all(status == 200 for status, _ in thumbs), thumbs
    originals = {f'"{row["sha256"]}"' for row in gallery.listing()}
    assert not any(etag in originals for _, etag in thumbs), "a tile got an original, not its thumbnail"


@pytest.mark.slow  # three axe scans at each of two sizes: about 15 s on a loaded machine
def test_accessibility_scan_and_screenshots(browser: Browser, gallery: Gallery, stored: list[str]) -> None:
    for size, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        context = browser.new_context(viewport=viewport)
        page = context.new_page()
        open_gallery(page, gallery)
        expect(tiles(page).first).to_have_attribute("src", re.compile("^blob:"), timeout=WAIT_MS)
        expect(page.locator("#grid .tile:not([hidden]) img.pending")).to_have_count(0, timeout=WAIT_MS)
        screenshot(page, f"grid-{size}")
        assert_accessible(page, "grid")
        tiles(page).first.click()
        expect(page.locator("#detail-img")).to_have_attribute("src", re.compile("^blob:"), timeout=WAIT_MS)
        if size == "phone":
            screenshot(page, "detail-phone")
        assert_accessible(page, "detail")
        page.keyboard.press("Escape")
        page.get_by_role("button", name="Add images").click()
        page.get_by_label("Image URLs, one per line").fill(gallery.origin.url("/img/1.jpg"))
        if size == "phone":
            screenshot(page, "submit-phone")
        assert_accessible(page, "submit")
        context.close()


def assert_accessible(page: Page, where: str) -> None:
    """axe-core (vendored, tests/vendor/axe.min.js) finds no serious or critical violation."""
    if not page.evaluate("typeof axe !== 'undefined'"):
        page.evaluate(AXE.read_text())  # through the DevTools protocol: the page's CSP forbids inline scripts
    result = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    serious = [(v["id"], v["help"], [n["target"] for n in v["nodes"]][:3])
               for v in result["violations"] if v["impact"] in ("serious", "critical")]
    assert not serious, f"{where}: {serious}"


@pytest.mark.slow
def test_100k_images_scroll_without_slowing(page: Page, gallery: Gallery, stored: list[str]) -> None:
    started = time.monotonic()
    index_copies(gallery, "many", 100_000)
    indexed = time.monotonic() - started
    open_gallery(page, gallery)
    metrics = page.evaluate("""async () => {
        const frames = [];
        let last = performance.now();
        const step = Math.max(400, document.body.scrollHeight / 120);
        for (let i = 0; i < 120; i++) {
            scrollBy(0, step);
            await new Promise((resolve) => requestAnimationFrame(resolve));
            const now = performance.now();
            frames.push(now - last);
            last = now;
        }
        frames.sort((a, b) => a - b);
        return {nodes: document.getElementsByTagName('*').length, tiles: document.querySelectorAll('.tile').length,
                p50: frames[60], p95: frames[114], height: document.body.scrollHeight};
    }""")
    print(f"\n100k index: indexed in {indexed:.1f} s; while scrolling: {metrics}")
    assert metrics["height"] > 100_000 / 8 * 100  # laid out for every image
    assert metrics["nodes"] < 1000, metrics  # the DOM holds a screenful of tiles, not one per image
    # ms a frame, a bound only against the pathological (a DOM of 100,000 tiles takes seconds per frame):
    # frame times on a shared 2-core machine follow its load (BENCHMARKS.md, "Gallery").
    assert metrics["p50"] < 500, metrics
