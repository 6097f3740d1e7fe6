"""The gallery: the static page in casimg/web/, served at / by `casimg serve` (CASIMG_UI=off turns it off).

The page is plain JavaScript modules and CSS, no build step and nothing fetched from elsewhere. It calls
only the public HTTP API, with the key a person pastes, so everything it does can be done with curl
(docs/gallery.md).

Assets are read once, at start, and served from memory under ``/ui/<version>/<name>``, where the version
is a hash over every asset's name and bytes: a new release changes the path, so the assets may be cached
for a year (``immutable``), and the modules' relative imports stay under the same version. The page
itself (``/``) names that version, so it is revalidated on every load (``no-cache``). The page and its
assets carry their own Content-Security-Policy; the API's answers keep theirs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

from casimg import errors
from casimg.handlers import UNMATCHED, BaseHandler
from casimg.services import Services

VERSION_DIGITS = 12  # of the assets' hash in their path: enough that two releases never share one
ASSET_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".svg": "image/svg+xml"}
PAGE_TEMPLATE = "index.html"
VERSION_MARK = "{{version}}"  # where index.html names its assets' version
ASSET_CACHE = "public, max-age=31536000, immutable"  # a path that names its content's hash never changes
PAGE_CACHE = "no-cache"  # the page names the current assets: revalidate it on every load
# Scripts and styles only from casimg's own files, never inline or eval'd; images from the API (fetched
# with the key, shown through blob: URLs) and the placeholders (data: PNGs); requests only to this origin.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass(frozen=True)
class Assets:
    version: str
    files: dict[str, bytes]  # name under casimg/web/ (e.g. "grid.js", "vendor/thumbhash.js") -> bytes
    page: bytes  # index.html with its assets' version filled in


def load_assets() -> Assets:
    """Read casimg/web/ whole: a few dozen KB, served from memory."""
    root = resources.files("casimg") / "web"
    files = dict(_walk(root, ""))
    template = files.pop(PAGE_TEMPLATE).decode()
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name] + b"\0")
    version = digest.hexdigest()[:VERSION_DIGITS]
    return Assets(version, files, template.replace(VERSION_MARK, version).encode())


def _walk(folder: Traversable, prefix: str) -> list[tuple[str, bytes]]:
    found: list[tuple[str, bytes]] = []
    for entry in folder.iterdir():
        if entry.is_dir():
            found += _walk(entry, f"{prefix}{entry.name}/")
        elif entry.name == PAGE_TEMPLATE or any(entry.name.endswith(ext) for ext in ASSET_TYPES):
            found.append((prefix + entry.name, entry.read_bytes()))
    return found


class _GalleryHandler(BaseHandler):
    """Serves from `assets`; needs no key (the page asks for one and sends it to the API itself)."""

    def initialize(self, services: Services, route: str = UNMATCHED, assets: Assets | None = None) -> None:
        super().initialize(services, route)
        assert assets is not None, "gallery_routes gives every gallery handler the assets"
        self.assets = assets

    def set_default_headers(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Content-Security-Policy", PAGE_CSP)


class PageHandler(_GalleryHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", PAGE_CACHE)
        self.finish(self.assets.page)  # tornado adds the ETag and answers If-None-Match with a 304

    def head(self) -> None:
        self.get()


class AssetHandler(_GalleryHandler):
    def get(self, version: str, name: str) -> None:
        body = self.assets.files.get(name)
        if body is None or version != self.assets.version:
            # An old version is gone: the page that named it is revalidated on its next load.
            raise errors.NotFound(f"no asset {name!r} in version {version!r}")
        self.set_header("Content-Type", ASSET_TYPES["." + name.rsplit(".", 1)[-1]])
        self.set_header("Cache-Control", ASSET_CACHE)
        self.finish(body)

    def head(self, version: str, name: str) -> None:
        self.get(version, name)


def gallery_routes(services: Services) -> list[tuple[str, type[_GalleryHandler], dict[str, object]]]:
    """The page at / and its assets under /ui/<version>/; outside the API's route table and OpenAPI."""
    assets = load_assets()
    return [
        (r"/", PageHandler, {"services": services, "route": "/", "assets": assets}),
        (r"/ui/(?P<version>[0-9a-f]+)/(?P<name>[a-z0-9_/-]+\.[a-z]+)", AssetHandler,
         {"services": services, "route": "/ui/{version}/{name}", "assets": assets}),
    ]
