"""Variants: what a request asks for, parsed and normalised once into a value that names it.

A variant is a derived image: the stored original resized (``w``, ``h``, ``fit``, ``bg``, ``enlarge``)
and re-encoded (``format``, ``q``, ``animated``), or a named preset (``variant=thumb``). The flow a
handler follows, with Pillow kept out of this module (rendering is casimg/render.py):

    policy = VariantPolicy.from_settings(settings)      # once, at start; bad presets fail here
    spec = policy.parse(query)                          # None: the original; BadVariant: a 400
    source = render.probe(blob)                         # the original's header: size, alpha, frames
    concrete = policy.resolve(spec, source, accept)     # concrete format and quality; size limits
    concrete.canonical                                  # names the stored variant: "v1:w=256&format=webp&q=80"
    spec.varies_on_accept                               # send Vary: Accept (format=auto)

Two steps, because a request does not say everything: ``format=auto`` is settled by the Accept header
and the source's transparency, and an absent ``format`` means the source's own. ``parse`` checks what
the query alone decides (syntax, ranges, combinations, presets); ``resolve`` settles the rest against
the source, so the canonical string names the concrete output and equal outputs share one name
whatever the spelling: parameter order, defaults written out, ``jpg`` for ``jpeg``, ``q`` on a PNG, a
``fit`` that one side makes moot, a box larger than the source without ``enlarge``.

Geometry (``layout``), in the source's display orientation (EXIF applied), never upscaling unless
``enlarge=1``:

- ``inside`` (default): the largest size that fits in the box, aspect kept.
- ``cover``: fills the box, cropping around the centre. ``fill``: stretches to the box. ``pad``: fits
  inside and letterboxes to the box with ``bg``. For these three, a box that would need upscaling is
  shrunk uniformly until it does not, so the output keeps the box's aspect ratio at the source's detail.
- With one side only, every fit is ``inside`` (the box is unbounded on the other side).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from casimg.errors import BadVariant, ConfigError

if TYPE_CHECKING:
    from casimg.config import Settings

# Bump when the renderer's output for the same parameters changes (filter, encoder settings): stored
# variants are named by the canonical string, so old ones stop being found and new ones are made.
RENDER_VERSION = "v1"

FITS = ("inside", "cover", "fill", "pad")
FORMATS = ("jpeg", "png", "webp", "avif", "gif")  # concrete outputs; gif only keeps an animation as GIF
FORMAT_ALIASES = {"jpg": "jpeg"}
AUTO = "auto"
ANIMATED_FORMATS = ("webp", "gif")
ALPHA_FORMATS = ("png", "webp", "avif", "gif")
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "avif": "image/avif",
                 "gif": "image/gif"}
# Qualities where each encoder's output stops improving visibly on photos, per format's own scale: AVIF
# at 60 is about JPEG at 85 in SSIM and half the bytes. PNG and GIF are lossless: q means nothing there.
DEFAULT_QUALITY = {"jpeg": 85, "webp": 80, "avif": 60}
SOURCE_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "AVIF": "avif", "GIF": "gif"}
DEFAULT_BG = "ffffff"
PARAMS = ("w", "h", "fit", "bg", "enlarge", "format", "q", "animated", "variant")
FREE_PARAMS = PARAMS[:-1]
_PARAM_NAMES = frozenset(PARAMS)
# Queries parsed, kept per process (QueryParser): a page asks for the same few variants again and again.
# Bounded, since free parameters let a client spell many; the oldest goes first.
QUERY_CACHE = 4096
MODES = ("on", "presets", "off")
_BG_RE = re.compile(r"#?([0-9a-fA-F]{6})")
_PRESET_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_FLAGS = {"0": False, "1": True, "false": False, "true": True}


@dataclass(frozen=True)
class VariantSpec:
    """One variant's parameters, normalised. ``format`` None: the source's own; ``auto``: by Accept.

    Concrete (``is_concrete``) once ``VariantPolicy.resolve`` has set a real format and its quality;
    only a concrete spec names a stored variant (``canonical``) or can be rendered.
    """

    w: int | None = None
    h: int | None = None
    fit: str = "inside"
    bg: str = DEFAULT_BG
    enlarge: bool = False
    format: str | None = None
    q: int | None = None
    animated: bool = False

    @property
    def is_concrete(self) -> bool:
        return self.format in FORMATS

    @property
    def varies_on_accept(self) -> bool:
        """True when the output depends on the request's Accept header (answers need Vary: Accept)."""
        return self.format == AUTO

    @property
    def content_type(self) -> str:
        if not self.is_concrete:
            raise ValueError(f"format {self.format!r} is not resolved yet")
        return CONTENT_TYPES[str(self.format)]

    def as_params(self) -> dict[str, str]:
        """The query parameters that ask for this spec, defaults left out; parse() gives the spec back."""
        params: dict[str, str] = {}
        if self.w is not None:
            params["w"] = str(self.w)
        if self.h is not None:
            params["h"] = str(self.h)
        if self.fit != "inside":
            params["fit"] = self.fit
        if self.bg != DEFAULT_BG:
            params["bg"] = self.bg
        if self.enlarge:
            params["enlarge"] = "1"
        if self.format is not None:
            params["format"] = self.format
        if self.q is not None:
            params["q"] = str(self.q)
        if self.animated:
            params["animated"] = "1"
        return params

    @property
    def canonical(self) -> str:
        """The variant's name for storage: equal concrete specs, and only they, give equal strings."""
        if not self.is_concrete:
            raise ValueError(f"format {self.format!r} is not resolved yet: call VariantPolicy.resolve")
        return RENDER_VERSION + ":" + "&".join(f"{key}={value}" for key, value in self.as_params().items())


@dataclass(frozen=True)
class SourceInfo:
    """What resolving needs to know of the original, read from its header (render.probe).

    ``width`` and ``height`` are as displayed, after the EXIF orientation.
    """

    format: str  # Pillow's name: JPEG, PNG, GIF, WEBP, AVIF
    width: int
    height: int
    has_alpha: bool = False
    frames: int = 1
    orientation: int = 1


@dataclass(frozen=True)
class Layout:
    """Where the pixels go: the resized image's size, the canvas it sits on, and whether to crop."""

    image: tuple[int, int]  # the source (or its centre crop) resized to this
    canvas: tuple[int, int]  # the output's size; larger than image only for pad
    crop: bool = False  # cover: take the centre of the source with the canvas's aspect ratio


def _scaled(size: float) -> int:
    return max(1, round(size))


def layout(width: int, height: int, spec: VariantSpec) -> Layout:
    """The output geometry for a source of width x height (display orientation); see the module doc."""
    w, h, enlarge = spec.w, spec.h, spec.enlarge
    if w is None and h is None:
        return Layout((width, height), (width, height))
    if w is None or h is None or spec.fit == "inside":
        scales = [side / source for side, source in ((w, width), (h, height)) if side is not None]
        scale = min(scales) if enlarge else min([*scales, 1.0])
        size = (_scaled(width * scale), _scaled(height * scale))
        return Layout(size, size)
    assert w is not None and h is not None
    if spec.fit == "pad":
        scale = min(w / width, h / height)
        box: tuple[int, int] = (w, h)
        if scale > 1 and not enlarge:
            box, scale = (_scaled(w / scale), _scaled(h / scale)), 1.0
        image = (min(box[0], _scaled(width * scale)), min(box[1], _scaled(height * scale)))
        return Layout(image, box)
    # cover and fill: the box itself, shrunk uniformly when it would make the source larger.
    need = max(w / width, h / height)
    box = (_scaled(w / need), _scaled(h / need)) if need > 1 and not enlarge else (w, h)
    return Layout(box, box, crop=spec.fit == "cover")


def _one(params: Mapping[str, str | Sequence[str]], name: str) -> str | None:
    raw = params.get(name)
    if raw is None or isinstance(raw, str):
        return raw
    values = list(raw)
    if len(set(values)) > 1:
        raise BadVariant(name, f"{name} is given more than once, with different values")
    return values[0] if values else None


def _whole(name: str, raw: str, low: int, high: int, limit: str = "") -> int:
    if not raw.isascii() or not raw.isdigit():
        raise BadVariant(name, f"{name} must be a whole number from {low} to {high}")
    named = f" ({limit})" if limit else ""
    digits = raw.lstrip("0") or "0"  # int() refuses over 4,300 digits, leading zeros included
    if len(digits) > len(str(high)):
        raise BadVariant(name, f"{name} must be from {low} to {high}{named}; got {len(raw)} digits")
    value = int(digits)
    if not low <= value <= high:
        raise BadVariant(name, f"{name} must be from {low} to {high}{named}; got {value}")
    return value


def _flag(name: str, raw: str) -> bool:
    try:
        return _FLAGS[raw.lower()]
    except KeyError:
        raise BadVariant(name, f"{name} must be 0 or 1") from None


def _choice(name: str, raw: str, choices: Sequence[str]) -> str:
    value = raw.lower()
    value = FORMAT_ALIASES.get(value, value) if name == "format" else value
    if value not in choices:
        raise BadVariant(name, f"{name} must be one of {', '.join(choices)}; got {raw!r}")
    return value


def parse_spec(params: Mapping[str, str | Sequence[str]], max_side: int) -> VariantSpec:
    """A spec from free parameters (no presets, no policy): syntax, ranges and combinations."""
    raw = {name: value for name in FREE_PARAMS if (value := _one(params, name)) is not None}
    w = _whole("w", raw["w"], 1, max_side, "variant_max_side") if "w" in raw else None
    h = _whole("h", raw["h"], 1, max_side, "variant_max_side") if "h" in raw else None
    fit = _choice("fit", raw["fit"], FITS) if "fit" in raw else "inside"
    if w is None or h is None:
        fit = "inside"  # with one side (or none) every fit gives the same picture
    bg = DEFAULT_BG
    if "bg" in raw:
        match = _BG_RE.fullmatch(raw["bg"])
        if not match:
            raise BadVariant("bg", f"bg must be a colour as six hex digits, RRGGBB; got {raw['bg']!r}")
        bg = match.group(1).lower()
    enlarge = _flag("enlarge", raw["enlarge"]) if "enlarge" in raw else False
    if w is None and h is None:
        enlarge = False
    fmt = _choice("format", raw["format"], (*FORMATS, AUTO)) if "format" in raw else None
    q = _whole("q", raw["q"], 1, 100) if "q" in raw else None
    animated = _flag("animated", raw["animated"]) if "animated" in raw else False
    if animated and fmt is not None and fmt not in (*ANIMATED_FORMATS, AUTO):
        raise BadVariant("animated", f"animated=1 needs format webp, gif or auto; format is {fmt}")
    return VariantSpec(w=w, h=h, fit=fit, bg=bg, enlarge=enlarge, format=fmt, q=q, animated=animated)


def parse_presets(text: str, max_side: int) -> dict[str, VariantSpec]:
    """Presets from their setting: ``thumb=w:256 h:256 fit:cover format:auto; hero=w:1600 format:auto``.

    Each preset is a name, ``=``, and ``parameter:value`` words; presets are separated by ``;`` (not by
    commas, which split list settings). A mistake is a ConfigError naming the preset.
    """
    presets: dict[str, VariantSpec] = {}
    for entry in (part.strip() for part in text.split(";")):
        if not entry:
            continue
        name, sep, body = (piece.strip() for piece in entry.partition("="))
        if not sep or not _PRESET_NAME_RE.fullmatch(name):
            raise ConfigError(f"Setting 'variant_presets': {entry!r} is not name=param:value ...")
        if name in presets:
            raise ConfigError(f"Setting 'variant_presets': preset {name!r} is defined twice")
        params: dict[str, str] = {}
        for word in body.split():
            key, colon, value = word.partition(":")
            if not colon or key not in FREE_PARAMS or key in params:
                raise ConfigError(f"Setting 'variant_presets': preset {name!r}: {word!r} is not one "
                                  f"parameter:value of {', '.join(FREE_PARAMS)}")
            params[key] = value
        if not params:
            raise ConfigError(f"Setting 'variant_presets': preset {name!r} has no parameters")
        try:
            presets[name] = parse_spec(params, max_side)
        except BadVariant as exc:
            raise ConfigError(f"Setting 'variant_presets': preset {name!r}: {exc}") from None
    return presets


def accepted_types(accept: str | None) -> frozenset[str]:
    """The image types an Accept header names with a quality above zero (wildcards do not count)."""
    types = set()
    for item in (accept or "").split(","):
        media, *options = (piece.strip() for piece in item.split(";"))
        quality = 1.0
        for option in options:
            key, _, value = option.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0 and media:
            types.add(media.lower())
    return frozenset(types)


@dataclass(frozen=True)
class VariantPolicy:
    """The settings' say over variants: the mode, the presets and the limits. Built once at start."""

    mode: str = "on"
    presets: Mapping[str, VariantSpec] = dataclasses.field(default_factory=dict)
    max_side: int = 4096
    max_pixels: int = 4096 * 4096
    per_original: int = 100

    @classmethod
    def from_settings(cls, settings: Settings) -> VariantPolicy:
        presets = parse_presets(settings.variant_presets, settings.variant_max_side)
        if settings.variants == "presets" and not presets:
            raise ConfigError("Setting 'variants' is 'presets' but 'variant_presets' defines none")
        policy = cls(mode=settings.variants, presets=presets, max_side=settings.variant_max_side,
                     max_pixels=settings.variant_max_pixels, per_original=settings.variants_per_original)
        for name, spec in presets.items():
            if spec.w and spec.h and spec.w * spec.h > policy.max_pixels:
                raise ConfigError(f"Setting 'variant_presets': preset {name!r} is over variant_max_pixels")
        return policy

    def parse(self, params: Mapping[str, str | Sequence[str]]) -> VariantSpec | None:
        """The spec a request's query asks for, or None when it asks for the original.

        Parameters other than the variant ones (``url``, ...) are not looked at.
        """
        given = [name for name in PARAMS if _one(params, name) is not None]
        if not given:
            return None
        if self.mode == "off":
            raise BadVariant(given[0], f"{given[0]}: variants are turned off on this server (variants=off)")
        free = [name for name in given if name != "variant"]
        preset = _one(params, "variant")
        if preset is None:
            if self.mode == "presets":
                raise BadVariant(free[0], f"{free[0]}: only presets are accepted here (variants=presets); "
                                          f"use variant={'|'.join(self.presets)}")
            return parse_spec(params, self.max_side)
        if free:
            raise BadVariant(free[0], f"variant={preset} cannot be combined with {free[0]}: a preset says it all")
        if preset not in self.presets:
            known = ", ".join(self.presets) or "none are configured"
            raise BadVariant("variant", f"variant {preset!r} is not a preset (presets: {known})")
        return self.presets[preset]

    def resolve(self, spec: VariantSpec, source: SourceInfo, accept: str | None = None) -> VariantSpec:
        """The concrete spec for this source and Accept header, checked against the output limits."""
        has_alpha = source.has_alpha
        animated = spec.animated and source.frames > 1
        fmt = spec.format
        if fmt is None:
            fmt = SOURCE_FORMATS.get(source.format, "png")
        elif fmt == AUTO:
            fmt = _auto_format(accepted_types(accept), has_alpha, animated)
        animated = animated and fmt in ANIMATED_FORMATS
        q = (spec.q or DEFAULT_QUALITY[fmt]) if fmt in DEFAULT_QUALITY else None
        w, h, enlarge = spec.w, spec.h, spec.enlarge
        if spec.fit == "inside" and not enlarge:
            # A side at least the source's own does not constrain: the same picture as leaving it out.
            w = None if w is not None and w >= source.width else w
            h = None if h is not None and h >= source.height else h
        fit = spec.fit if w is not None and h is not None else "inside"
        enlarge = enlarge and (w is not None or h is not None)
        # bg shows only on a pad's border or under transparency flattened into a format without alpha.
        bg = spec.bg if fit == "pad" or (has_alpha and fmt not in ALPHA_FORMATS) else DEFAULT_BG
        concrete = VariantSpec(w=w, h=h, fit=fit, bg=bg, enlarge=enlarge, format=fmt, q=q, animated=animated)
        width, height = layout(source.width, source.height, concrete).canvas
        if width > self.max_side or height > self.max_side:
            raise BadVariant("w" if width > self.max_side else "h",
                             f"the output would be {width}x{height}, over variant_max_side ({self.max_side})")
        if width * height > self.max_pixels:
            raise BadVariant("w" if spec.w else "h",
                             f"the output would be {width}x{height} = {width * height} pixels, over "
                             f"variant_max_pixels ({self.max_pixels})")
        return concrete

    def check_count(self, existing: int) -> None:
        """Refuse a new variant of an original that already has ``per_original`` of them."""
        if existing >= self.per_original:
            raise BadVariant("variant", f"this image already has {existing} variants, the most "
                                        f"variants_per_original ({self.per_original}) allows")


QueryKey = tuple[tuple[str | bytes, ...], ...]


class QueryParser:
    """``VariantPolicy.parse`` for a request's raw query arguments (Tornado's ``{name: [bytes, ...]}``),
    remembered: a cached variant's GET then costs a dictionary lookup here, not the parse (6 µs for a
    preset, 14 for four free parameters, against the 200 µs of a whole request). Only specs are kept, the
    policy being fixed for the process's life; a query that fails (BadVariant) is parsed again each time.
    """

    def __init__(self, policy: VariantPolicy, size: int = QUERY_CACHE) -> None:
        self.policy = policy
        self.size = size
        self._specs: dict[QueryKey, VariantSpec | None] = {}

    def spec(self, arguments: Mapping[str, Sequence[bytes]]) -> VariantSpec | None:
        """The spec the query asks for, None for the original; BadVariant (a 400) names a bad parameter."""
        key = tuple((name, *values) for name, values in arguments.items() if name in _PARAM_NAMES)
        if not key:
            return None
        try:
            return self._specs[key]
        except KeyError:
            pass
        spec = self.policy.parse({str(name): [bytes(value).decode("utf-8", "replace") for value in values]
                                  for name, *values in key})
        if not _cacheable(key):
            return spec
        if len(self._specs) >= self.size:
            del self._specs[next(iter(self._specs))]
        self._specs[key] = spec
        return spec


QUERY_CACHE_VALUE = 256  # longest parameter value a remembered query may have, in bytes


def _cacheable(key: QueryKey) -> bool:
    """Only queries such as pages send, each parameter once and short, are remembered: the cache is
    bounded by entries, so an entry's size must be bounded too (a query repeating ``w=1`` thousands of
    times parses, and would otherwise keep all of them)."""
    return all(len(values) == 1 and len(values[0]) <= QUERY_CACHE_VALUE for _name, *values in key)


def _auto_format(accepted: frozenset[str], has_alpha: bool, animated: bool) -> str:
    if animated:
        return "webp" if "image/webp" in accepted else "gif"
    if "image/avif" in accepted:
        return "avif"
    if "image/webp" in accepted:
        return "webp"
    return "png" if has_alpha else "jpeg"
