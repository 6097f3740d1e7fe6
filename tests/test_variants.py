"""Variants: parameters and their canonical names, presets and limits, the renderer, the pool, placeholders.

Every image is made here with Pillow and every output is decoded back with Pillow; the pool runs real
worker processes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageCms, ImageDraw

from casimg import placeholder as ph
from casimg.config import load_settings
from casimg.errors import (
    BadRequest,
    BadVariant,
    ConfigError,
    RenderOverBudget,
    RenderTimeout,
    Unavailable,
    Unrenderable,
)
from casimg.render import TRANSPOSE, probe, render
from casimg.render_pool import RenderPool
from casimg.variants import QueryParser, SourceInfo, VariantPolicy, VariantSpec, layout, parse_presets

BUDGET = 512 * 2**20
POLICY = VariantPolicy()
PHOTO = SourceInfo("JPEG", 4000, 3000)
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **options)
    return out.getvalue()


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def close(pixel, colour, tolerance=40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel[:3], colour, strict=True))


def variant(data: bytes, accept: str | None = None, **params: str):
    spec = POLICY.parse(params)
    assert spec is not None
    return render(data, POLICY.resolve(spec, probe(data), accept), max_memory=BUDGET)


def quadrants(width: int = 80, height: int = 40) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right."""
    im = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 0, width // 2 - 1, height // 2 - 1), RED)
    draw.rectangle((width // 2, 0, width - 1, height // 2 - 1), GREEN)
    draw.rectangle((0, height // 2, width // 2 - 1, height - 1), BLUE)
    return im


# --- parameters, canonical names -------------------------------------------------------------------


@pytest.mark.parametrize("spellings", [
    [{"w": "256", "format": "jpeg"}, {"format": "jpg", "w": "256", "fit": "inside", "q": "85", "enlarge": "0"}],
    [{"w": "256", "h": "256", "fit": "cover", "format": "webp"},
     {"fit": "COVER", "h": "256", "w": "256", "format": "webp", "q": "80", "bg": "FFFFFF", "animated": "0"}],
    [{"w": "300", "format": "png"}, {"w": "300", "format": "png", "q": "40"},
     {"w": "300", "fit": "pad", "format": "png"}],
    [{"format": "png"}, {"format": "png", "w": "4096", "h": "4096"}, {"format": "png", "w": "4000"},
     {"format": "png", "enlarge": "0", "fit": "fill"}],
    [{"w": "100", "h": "100", "fit": "pad", "bg": "#00FF00", "format": "jpeg"},
     {"bg": "00ff00", "fit": "pad", "w": "100", "h": "100", "format": "jpeg", "q": "85"}],
    [{"w": "100", "format": "auto"}, {"w": "100", "format": "avif", "q": "60"}],
])
def test_equal_parameters_have_one_canonical_name_whatever_their_spelling(spellings):
    accept = "image/avif,image/webp,*/*;q=0.8"
    names = {POLICY.resolve(POLICY.parse(params), PHOTO, accept).canonical for params in spellings}
    assert len(names) == 1, names
    assert next(iter(names)).startswith("v1:")


def test_different_outputs_have_different_names():
    params = [{"w": "256"}, {"w": "257"}, {"w": "256", "q": "84"}, {"w": "256", "format": "webp"},
              {"w": "256", "h": "100"}, {"w": "256", "h": "100", "fit": "cover"},
              {"w": "256", "h": "100", "fit": "fill"},
              {"w": "256", "h": "100", "fit": "pad"}, {"w": "256", "h": "100", "fit": "pad", "bg": "000000"},
              {"w": "4096", "enlarge": "1"}]
    names = [POLICY.resolve(POLICY.parse(p), PHOTO).canonical for p in params]
    assert len(set(names)) == len(names), names


def test_a_spec_gives_back_the_parameters_that_make_it():
    for params in ({"w": "10", "h": "20", "fit": "pad", "bg": "123abc", "enlarge": "1", "format": "webp", "q": "5",
                    "animated": "1"}, {"h": "7"}, {"format": "auto"}):
        spec = POLICY.parse(params)
        assert POLICY.parse(spec.as_params()) == spec


def test_no_variant_parameters_means_the_original_and_other_parameters_are_not_looked_at():
    assert POLICY.parse({"url": "https://example.com/a.jpg", "wait": "3"}) is None
    assert POLICY.parse({"url": "x", "w": "5"}) == VariantSpec(w=5)
    assert POLICY.parse({"w": "5", "fit": "cover", "enlarge": "1"}) == VariantSpec(w=5, enlarge=True)
    assert POLICY.parse({"format": "png", "enlarge": "1"}) == VariantSpec(format="png")  # nothing to enlarge


def test_an_unresolved_spec_names_nothing():
    with pytest.raises(ValueError, match="resolve"):
        _ = VariantSpec(w=5, format="auto").canonical
    with pytest.raises(ValueError, match="resolve"):
        _ = VariantSpec(w=5).canonical


@pytest.mark.parametrize(("params", "parameter", "fragment"), [
    ({"w": "abc"}, "w", "whole number"),
    ({"w": "0"}, "w", "from 1"),
    ({"w": "4097"}, "w", "variant_max_side"),
    ({"h": "-3"}, "h", "whole number"),
    ({"h": "1e3"}, "h", "whole number"),
    ({"w": "10", "h": "10", "fit": "stretch"}, "fit", "inside, cover, fill, pad"),
    ({"bg": "red"}, "bg", "RRGGBB"),
    ({"bg": "12345"}, "bg", "RRGGBB"),
    ({"enlarge": "yes"}, "enlarge", "0 or 1"),
    ({"format": "tiff"}, "format", "jpeg, png, webp, avif, gif, auto"),
    ({"q": "0"}, "q", "from 1 to 100"),
    ({"q": "101"}, "q", "from 1 to 100"),
    ({"q": ""}, "q", "whole number"),
    ({"animated": "2"}, "animated", "0 or 1"),
    ({"animated": "1", "format": "jpeg"}, "animated", "webp, gif or auto"),
    ({"w": ["10", "20"]}, "w", "more than once"),
    ({"variant": "nope"}, "variant", "not a preset"),
])
def test_bad_parameters_are_refused_naming_the_parameter(params, parameter, fragment):
    with pytest.raises(BadVariant, match=fragment) as caught:
        POLICY.parse(params)
    assert caught.value.parameter == parameter
    assert parameter in str(caught.value)
    assert isinstance(caught.value, BadRequest)  # the one mapping makes it a 400 problem+json


def test_a_repeated_parameter_with_one_value_is_that_value():
    assert POLICY.parse({"w": ["10", "10"]}) == VariantSpec(w=10)


# --- format=auto, Accept -----------------------------------------------------------------------------


@pytest.mark.parametrize(("accept", "source", "expected"), [
    ("image/avif,image/webp,image/apng,*/*;q=0.8", PHOTO, "avif"),
    ("image/webp,*/*", PHOTO, "webp"),
    ("image/avif;q=0,image/webp", PHOTO, "webp"),
    ("*/*", PHOTO, "jpeg"),
    (None, PHOTO, "jpeg"),
    ("image/*", SourceInfo("PNG", 10, 10, has_alpha=True), "png"),
    ("image/avif,image/webp", SourceInfo("GIF", 10, 10, frames=3), "avif"),  # animated=0: the first frame
])
def test_auto_picks_from_accept_and_transparency(accept, source, expected):
    spec = POLICY.parse({"w": "5", "format": "auto"})
    assert spec.varies_on_accept
    concrete = POLICY.resolve(spec, source, accept)
    assert concrete.format == expected and not concrete.varies_on_accept
    assert concrete.canonical.count("format=" + expected) == 1


def test_auto_keeps_an_animation_in_webp_or_gif():
    gif = SourceInfo("GIF", 10, 10, frames=3)
    spec = POLICY.parse({"format": "auto", "animated": "1"})
    assert POLICY.resolve(spec, gif, "image/avif,image/webp").format == "webp"
    assert POLICY.resolve(spec, gif, "image/avif").format == "gif"
    still = POLICY.resolve(spec, SourceInfo("PNG", 10, 10), "image/webp")
    assert not still.animated  # nothing to animate: the same variant as animated=0
    assert still == POLICY.resolve(POLICY.parse({"format": "auto"}), SourceInfo("PNG", 10, 10), "image/webp")


def test_no_format_means_the_sources_own():
    spec = POLICY.parse({"w": "5"})
    assert not spec.varies_on_accept
    for fmt, expected in (("JPEG", "jpeg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"), ("AVIF", "avif")):
        assert POLICY.resolve(spec, SourceInfo(fmt, 10, 10)).format == expected


# --- presets, modes, limits ---------------------------------------------------------------------------

PRESETS = "thumb=w:256 h:256 fit:cover format:auto; hero=w:1600 format:auto"


def test_presets_from_the_environment_form_and_a_preset_names_what_its_parameters_name():
    presets = parse_presets(PRESETS, 4096)
    assert presets["thumb"] == VariantSpec(w=256, h=256, fit="cover", format="auto")
    assert presets["hero"] == VariantSpec(w=1600, format="auto")
    policy = VariantPolicy(presets=presets)
    by_preset = policy.resolve(policy.parse({"variant": "thumb"}), PHOTO, "image/webp")
    by_params = policy.resolve(policy.parse({"w": "256", "h": "256", "fit": "cover", "format": "auto"}), PHOTO,
                               "image/webp")
    assert by_preset.canonical == by_params.canonical


def test_presets_from_a_toml_table(tmp_path):
    config = tmp_path / "casimg.toml"
    config.write_text('variants = "presets"\n\n[variant_presets]\nthumb = { w = 256, h = 256, fit = "cover", '
                      'enlarge = true }\nhero = "w:1600 format:auto"\n')
    policy = VariantPolicy.from_settings(load_settings(config, environ={}))
    assert policy.mode == "presets"
    assert policy.presets == {"thumb": VariantSpec(w=256, h=256, fit="cover", enlarge=True),
                              "hero": VariantSpec(w=1600, format="auto")}
    env = load_settings(environ={"CASIMG_VARIANT_PRESETS": PRESETS, "CASIMG_VARIANTS": "presets"})
    assert set(VariantPolicy.from_settings(env).presets) == {"thumb", "hero"}


@pytest.mark.parametrize(("text", "fragment"), [
    ("thumb", "name=param:value"),
    ("thumb=w:256; thumb=w:10", "defined twice"),
    ("thumb=width:256", "'width:256'"),
    ("thumb=w:256 w:300", "'w:300'"),
    ("thumb=", "no parameters"),
    ("thumb=w:0", "preset 'thumb': w must be"),
    ("thumb=w:1 fit:huge", "preset 'thumb': fit must be"),
    ("bad name=w:1", "name=param:value"),
])
def test_bad_presets_fail_at_start_naming_the_preset(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_presets(text, 4096)


def test_presets_mode_refuses_free_parameters_and_needs_presets():
    policy = VariantPolicy(mode="presets", presets=parse_presets(PRESETS, 4096))
    assert policy.parse({"variant": "hero"}) == VariantSpec(w=1600, format="auto")
    for params, parameter in (({"w": "256"}, "w"), ({"format": "webp"}, "format"), ({"q": "50", "w": "1"}, "w")):
        with pytest.raises(BadVariant, match="only presets") as caught:
            policy.parse(params)
        assert caught.value.parameter == parameter and "variant=thumb|hero" in str(caught.value)
    with pytest.raises(ConfigError, match="defines none"):
        VariantPolicy.from_settings(load_settings(environ={"CASIMG_VARIANTS": "presets", "CASIMG_VARIANT_PRESETS": ""}))
    # The default presets hold the gallery's thumb, so presets mode works out of the box.
    assert set(VariantPolicy.from_settings(load_settings(environ={"CASIMG_VARIANTS": "presets"})).presets) == {"thumb"}


def test_a_preset_with_free_parameters_is_refused():
    policy = VariantPolicy(presets=parse_presets(PRESETS, 4096))
    with pytest.raises(BadVariant, match="cannot be combined with w") as caught:
        policy.parse({"variant": "thumb", "w": "10"})
    assert caught.value.parameter == "w"


def test_off_mode_refuses_every_variant_parameter():
    policy = VariantPolicy(mode="off")
    assert policy.parse({"url": "x"}) is None
    with pytest.raises(BadVariant, match="turned off") as caught:
        policy.parse({"format": "webp"})
    assert caught.value.parameter == "format"


def test_query_parser_remembers_parsed_queries_within_its_bound():
    policy = VariantPolicy(presets=parse_presets(PRESETS, 4096))
    parser = QueryParser(policy, size=2)
    url = [b"http://example.com/a.jpg"]
    assert parser.spec({"url": url}) is None
    assert parser.spec({"url": url, "variant": [b"thumb"]}) == policy.parse({"variant": "thumb"})
    free = parser.spec({"w": [b"256"], "url": url, "format": [b"webp"]})
    assert free == VariantSpec(w=256, format="webp")
    # Asked again (another URL, the same parameters): the spec remembered, not a new parse.
    assert parser.spec({"url": [b"http://example.com/b.jpg"], "w": [b"256"], "format": [b"webp"]}) is free
    # Past its size the oldest goes (the thumb's, then the free one's): parsed again, equal but a new value.
    assert parser.spec({"h": [b"10"]}) == VariantSpec(h=10)
    assert parser.spec({"q": [b"50"]}) == VariantSpec(q=50)
    again = parser.spec({"w": [b"256"], "format": [b"webp"]})
    assert again == free and again is not free
    assert len(parser._specs) == 2


def test_query_parser_answers_bad_queries_as_the_policy_does_every_time():
    parser = QueryParser(VariantPolicy(presets=parse_presets(PRESETS, 4096)))
    for _ in range(2):  # a failure is not remembered as an answer
        with pytest.raises(BadVariant, match="cannot be combined with w") as caught:
            parser.spec({"variant": [b"thumb"], "w": [b"10"]})
        assert caught.value.parameter == "w"
        with pytest.raises(BadVariant, match="more than once") as caught:
            parser.spec({"w": [b"10", b"20"]})
        with pytest.raises(BadVariant) as caught:
            parser.spec({"fit": [b"\xff"]})  # not UTF-8: replaced, then refused as an unknown fit
        assert caught.value.parameter == "fit"
    assert parser._specs == {}


def test_query_parser_keeps_only_small_queries():
    """The cache is bounded by entries, so an entry must be small: a query repeating one value thousands
    of times parses (the copies agree) but is not kept, and neither is a long value."""
    parser = QueryParser(VariantPolicy(presets=parse_presets(PRESETS, 4096)))
    assert parser.spec({"w": [b"1"] * 5000}) == VariantSpec(w=1)
    assert parser.spec({"w": [b"0" * 300 + b"1"]}) == VariantSpec(w=1)  # leading zeros: a long value
    assert parser._specs == {}
    assert parser.spec({"w": [b"1"]}) == VariantSpec(w=1)
    assert len(parser._specs) == 1


def test_limits_are_refused_naming_the_limit():
    policy = VariantPolicy(max_side=1000, max_pixels=500_000, per_original=3)
    with pytest.raises(BadVariant, match="variant_max_side") as caught:
        policy.parse({"h": "1001"})
    assert caught.value.parameter == "h"
    with pytest.raises(BadVariant, match="variant_max_pixels"):  # 1000 x 750 from the 4000 x 3000 photo
        policy.resolve(policy.parse({"w": "1000"}), PHOTO)
    with pytest.raises(BadVariant, match="variant_max_side"):  # a format change keeps the source's size
        policy.resolve(policy.parse({"format": "webp"}), PHOTO)
    assert policy.resolve(policy.parse({"w": "800"}), PHOTO).w == 800
    policy.check_count(2)
    with pytest.raises(BadVariant, match=r"variants_per_original \(3\)"):
        policy.check_count(3)
    with pytest.raises(ConfigError, match="'hero' is over variant_max_pixels"):
        VariantPolicy.from_settings(load_settings(environ={
            "CASIMG_VARIANT_PRESETS": "hero=w:1000 h:1000", "CASIMG_VARIANT_MAX_PIXELS": "1000"}))


@pytest.mark.parametrize(("env", "fragment"), [
    ({"CASIMG_VARIANTS": "maybe"}, "'variants'"),
    ({"CASIMG_RENDER_WORKERS": "0"}, "'render_workers' must be at least 1"),
    ({"CASIMG_RENDER_TIMEOUT": "0"}, "render_timeout"),
    ({"CASIMG_VARIANT_MAX_SIDE": "0"}, "'variant_max_side' must be at least 1"),
])
def test_bad_variant_settings_fail_clearly(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_settings(environ=env)


# --- geometry and fits --------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "image", "canvas"), [
    ({"w": "100"}, (100, 50), (100, 50)),
    ({"w": "100", "h": "100"}, (100, 50), (100, 50)),
    ({"w": "100", "h": "100", "fit": "cover"}, (100, 100), (100, 100)),
    ({"w": "100", "h": "100", "fit": "fill"}, (100, 100), (100, 100)),
    ({"w": "100", "h": "100", "fit": "pad"}, (100, 50), (100, 100)),
    ({"w": "800"}, (400, 200), (400, 200)),  # never upscaled...
    ({"w": "800", "enlarge": "1"}, (800, 400), (800, 400)),  # ...unless asked
    ({"w": "800", "h": "800", "fit": "cover"}, (200, 200), (200, 200)),  # the box shrinks to the source's detail
    ({"w": "800", "h": "400", "fit": "fill"}, (400, 200), (400, 200)),
    ({"w": "800", "h": "800", "fit": "pad"}, (400, 200), (400, 400)),
    ({"w": "800", "h": "800", "fit": "pad", "enlarge": "1"}, (800, 400), (800, 800)),
    ({"h": "50", "fit": "cover"}, (100, 50), (100, 50)),  # one side: every fit is inside
])
def test_layout(params, image, canvas):
    spec = POLICY.parse(params)
    plan = layout(400, 200, spec)
    assert (plan.image, plan.canvas) == (image, canvas)


def test_every_fit_puts_the_pixels_where_it_says():
    source = encode(quadrants(400, 200), "PNG")  # red | green over blue | white, 2:1
    inside = decode(variant(source, w="100", h="100", format="png").data)
    assert inside.size == (100, 50) and close(inside.getpixel((5, 5)), RED) and close(inside.getpixel((95, 45)), WHITE)
    cover = decode(variant(source, w="100", h="100", fit="cover", format="png").data)
    assert cover.size == (100, 100)
    # The centre square of a 2:1 picture: from x=100 to x=300 of the source, so half red, half green above.
    assert close(cover.getpixel((5, 5)), RED) and close(cover.getpixel((95, 5)), GREEN)
    assert close(cover.getpixel((5, 95)), BLUE) and close(cover.getpixel((95, 95)), WHITE)
    fill = decode(variant(source, w="100", h="100", fit="fill", format="png").data)
    assert fill.size == (100, 100) and close(fill.getpixel((5, 5)), RED) and close(fill.getpixel((5, 95)), BLUE)
    pad = decode(variant(source, w="100", h="100", fit="pad", bg="000000", format="png").data)
    assert pad.size == (100, 100)
    assert pad.getpixel((50, 10))[:3] == (0, 0, 0) and pad.getpixel((50, 90))[:3] == (0, 0, 0)  # the bars
    assert close(pad.getpixel((5, 30)), RED) and close(pad.getpixel((95, 70)), WHITE)
    same = decode(variant(source, w="800", format="png").data)
    assert same.size == (400, 200)
    bigger = variant(source, w="800", enlarge="1", format="png")
    assert (bigger.width, bigger.height) == (800, 400) == decode(bigger.data).size


# --- orientation ------------------------------------------------------------------------------------

UNDO = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270}


def stored_with_orientation(display: Image.Image, orientation: int) -> bytes:
    """A JPEG whose pixels, turned by its EXIF orientation as a viewer does, show `display`."""
    stored = display.transpose(UNDO[orientation]) if orientation in UNDO else display
    assert (stored.transpose(TRANSPOSE[orientation]) if orientation in TRANSPOSE else stored).tobytes() \
        == display.tobytes()
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    data = stored_with_orientation(quadrants(80, 40), orientation)
    info = probe(data)
    assert (info.width, info.height, info.orientation) == (80, 40, orientation)
    out = variant(data, w="40", format="png")
    im = decode(out.data)
    assert im.size == (40, 20) == (out.width, out.height)
    assert close(im.getpixel((2, 2)), RED) and close(im.getpixel((37, 2)), GREEN)
    assert close(im.getpixel((2, 17)), BLUE) and close(im.getpixel((37, 17)), WHITE)
    # Cropping happens on the upright picture too.
    square = decode(variant(data, w="20", h="20", fit="cover", format="png").data)
    assert close(square.getpixel((1, 1)), RED) and close(square.getpixel((18, 18)), WHITE)


# --- formats in and out, metadata ------------------------------------------------------------------


def sources() -> dict[str, bytes]:
    picture = quadrants(64, 48)
    rgba = picture.convert("RGBA")
    rgba.putpixel((63, 47), (0, 0, 0, 0))
    return {
        "JPEG": encode(picture, "JPEG", quality=95),
        "JPEG-CMYK": encode(picture.convert("CMYK"), "JPEG", quality=95),
        "JPEG-grey": encode(picture.convert("L").point(lambda v: 255 if v < 100 else v), "JPEG", quality=95),
        "PNG": encode(picture, "PNG"),
        "PNG-RGBA": encode(rgba, "PNG"),
        "PNG-P": encode(picture.convert("P"), "PNG", transparency=0),
        "PNG-16": encode(Image.new("I;16", (64, 48), 30000), "PNG"),
        "GIF": encode(picture.convert("P"), "GIF"),
        "WEBP": encode(picture, "WEBP", lossless=True),
        "AVIF": encode(picture, "AVIF", quality=90),
    }


@pytest.mark.parametrize("source_name", list(sources()))
@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "avif", "gif"])
def test_each_input_format_to_each_output_format(source_name, fmt):
    out = variant(sources()[source_name], w="32", format=fmt)
    im = decode(out.data)
    assert im.format == fmt.upper() and out.content_type == f"image/{fmt}"
    assert im.size == (32, 24) == (out.width, out.height)
    if source_name not in ("PNG-16", "JPEG-grey"):
        assert close(im.convert("RGB").getpixel((3, 3)), RED, 60)
    elif source_name == "PNG-16":  # 30000 of 65535, not clipped to white
        assert close(im.convert("RGB").getpixel((3, 3)), (117, 117, 117), 8)
    assert "exif" not in im.info and "icc_profile" not in im.info and "xmp" not in im.info


def test_variants_carry_no_metadata():
    exif = Image.Exif()
    exif[0x0112] = 1
    exif[0x010F] = "CameraMaker"
    exif.get_ifd(0x8825)[2] = (52.0, 31.0, 12.0)  # GPS latitude
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description secret="1"/></x:xmpmeta>'
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encode(quadrants(64, 48), "JPEG", exif=exif.tobytes(), icc_profile=icc, xmp=xmp)
    original = decode(data)
    assert original.getexif() and original.info.get("icc_profile") and original.info.get("xmp")
    for fmt in ("jpeg", "png", "webp", "avif", "gif"):
        out = variant(data, w="32", format=fmt)
        im = decode(out.data)
        assert not im.getexif(), fmt
        assert not {"exif", "icc_profile", "xmp", "XML:com.adobe.xmp"} & set(im.info), (fmt, set(im.info))
        for marker in (b"CameraMaker", b"secret", b"Exif\x00"):
            assert marker not in out.data, (fmt, marker)
        assert close(im.convert("RGB").getpixel((3, 3)), RED, 60)  # colours survive the sRGB conversion


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)


def swapped_primaries_profile() -> bytes:
    """An ICC v2 RGB display profile whose red primary is sRGB's green and whose green is sRGB's red."""
    red, green, blue = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)  # D50
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0233) + b"\0\0"  # gamma 2.2
    tags = [(b"wtpt", _xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", _xyz(*green)), (b"gXYZ", _xyz(*red)),
            (b"bXYZ", _xyz(*blue)), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for signature, data in tags:
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (struct.pack(">I", offset + len(body)) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
              + bytes(12) + b"acsp" + bytes(28) + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + body


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "avif"])
def test_an_embedded_colour_profile_is_converted_to_srgb_and_dropped(fmt):
    """Stored red under a profile whose red is green looks green: so must the variant, untagged."""
    data = encode(Image.new("RGB", (40, 40), RED), "PNG", icc_profile=swapped_primaries_profile())
    out = decode(variant(data, w="20", format=fmt).data)
    assert "icc_profile" not in out.info
    assert close(out.convert("RGB").getpixel((10, 10)), GREEN, 50)


def test_a_blob_file_renders_as_its_bytes(tmp_path):
    data = stored_with_orientation(quadrants(80, 40), 6)
    path = tmp_path / "blob"
    path.write_bytes(data)
    spec = POLICY.resolve(POLICY.parse({"w": "40", "format": "webp"}), probe(path))
    assert probe(path) == probe(data)
    assert render(path, spec, max_memory=BUDGET) == render(data, spec, max_memory=BUDGET)
    assert ph.placeholder(path) == ph.placeholder(str(path)) == ph.placeholder(data)


def test_transparency_flattens_onto_bg_in_jpeg_and_stays_in_png():
    im = Image.new("RGBA", (40, 40), (0, 0, 255, 255))
    im.paste((0, 0, 0, 0), (0, 0, 20, 40))
    data = encode(im, "PNG")
    assert probe(data).has_alpha
    flat = decode(variant(data, format="jpeg", bg="ff0000").data)
    assert close(flat.getpixel((5, 20)), RED) and close(flat.getpixel((35, 20)), BLUE)
    kept = decode(variant(data, format="png").data)
    assert kept.mode == "RGBA" and kept.getpixel((5, 20))[3] == 0
    assert POLICY.resolve(POLICY.parse({"format": "auto"}), probe(data), "*/*").format == "png"
    # bg only matters where it shows: an opaque source into JPEG ignores it.
    opaque = SourceInfo("JPEG", 40, 40)
    assert POLICY.resolve(POLICY.parse({"format": "jpeg", "bg": "ff0000"}), opaque) == \
        POLICY.resolve(POLICY.parse({"format": "jpeg"}), opaque)


# --- animation ---------------------------------------------------------------------------------------


def animation(fmt: str, frames=(RED, GREEN, BLUE)) -> bytes:
    images = [Image.new("RGB", (40, 30), colour) for colour in frames]
    return encode(images[0], fmt, save_all=True, append_images=images[1:], duration=[100, 200, 300], loop=0)


@pytest.mark.parametrize("source_fmt", ["GIF", "WEBP"])
def test_animation_is_the_first_frame_unless_kept(source_fmt):
    data = animation(source_fmt)
    assert probe(data).frames == 3
    first = decode(variant(data, w="20", format="webp").data)
    assert getattr(first, "n_frames", 1) == 1 and close(first.convert("RGB").getpixel((5, 5)), RED)
    for fmt in ("webp", "gif"):
        out = variant(data, w="20", format=fmt, animated="1")
        im = Image.open(io.BytesIO(out.data))
        assert im.n_frames == 3 and out.frames == 3 and im.size == (20, 15)
        colours = []
        for index in range(3):
            im.seek(index)
            colours.append(im.convert("RGB").getpixel((5, 5)))
        assert [close(c, e, 60) for c, e in zip(colours, (RED, GREEN, BLUE), strict=True)] == [True] * 3, colours
        im.seek(1)
        im.load()
        assert im.info.get("duration") == 200
    stills = decode(variant(data, w="20", format="gif").data)
    assert getattr(stills, "n_frames", 1) == 1


def test_too_many_frames_to_keep_is_refused():
    data = animation("GIF")
    spec = POLICY.resolve(POLICY.parse({"format": "webp", "animated": "1"}), probe(data))
    with pytest.raises(Unrenderable, match="max_frames"):
        render(data, spec, max_memory=BUDGET, max_frames=2)


# --- the memory estimate ------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height but whose pixel data is one short, broken IDAT chunk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) \
        + chunk(b"IEND", b"")


def test_over_the_memory_estimate_is_refused_before_decoding():
    huge = png_claiming(9000, 9000)  # 81 Mpx: 567 MB to decode and convert, in a 100-byte file
    spec = POLICY.resolve(POLICY.parse({"w": "256"}), probe(huge))
    with pytest.raises(RenderOverBudget, match="render_max_memory") as caught:
        render(huge, spec, max_memory=BUDGET)
    assert caught.value.estimate > caught.value.budget == BUDGET
    # Within the budget the same file gets as far as decoding, and fails there: the refusal came first.
    small = png_claiming(300, 300)
    with pytest.raises(Unrenderable) as broken:
        render(small, POLICY.resolve(POLICY.parse({"w": "256"}), probe(small)), max_memory=BUDGET)
    assert not isinstance(broken.value, RenderOverBudget)


def test_jpeg_dct_scaling_counts_in_the_estimate():
    photo = encode(Image.new("RGB", (2000, 1500), RED), "JPEG")
    budget = 8 * 2**20  # a full decode needs 3M pixels x 7 bytes = 21 MB; at 1/4 scale 1.3 MB
    thumb = render(photo, POLICY.resolve(POLICY.parse({"w": "200"}), probe(photo)), max_memory=budget)
    assert (thumb.width, thumb.height) == (200, 150)
    with pytest.raises(RenderOverBudget):
        render(photo, POLICY.resolve(POLICY.parse({"format": "png"}), probe(photo)), max_memory=budget)


def test_a_stored_image_that_does_not_decode_is_unrenderable():
    with pytest.raises(Unrenderable, match="cannot be decoded"):
        probe(b"not an image at all")
    truncated = encode(quadrants(200, 200), "JPEG")[:300]
    with pytest.raises(Unrenderable):
        render(truncated, VariantSpec(w=10, format="png"), max_memory=BUDGET)


def test_render_needs_a_resolved_spec():
    with pytest.raises(BadVariant, match="resolved"):
        render(encode(quadrants(), "PNG"), VariantSpec(w=10, format="auto"), max_memory=BUDGET)


# --- the pool --------------------------------------------------------------------------------------


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_until(condition, deadline: float = 30.0) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


NOISE = Image.effect_noise((64, 64), 80).convert("RGB")


def slow_render(fmt: str = "avif", side: int = 4096) -> tuple[bytes, VariantSpec]:
    """Noise enlarged to 16 Mpx and encoded: several seconds of work (6 s for AVIF on an idle core)."""
    source = encode(NOISE, "PNG")
    params = {"w": str(side), "h": str(side), "fit": "fill", "enlarge": "1", "format": fmt}
    return source, POLICY.resolve(POLICY.parse(params), probe(source))


def test_pool_renders_refuses_and_abandons_a_render_past_its_time():
    """A render made slow on purpose gets RenderTimeout and its workers are killed at once, not left
    to finish; the pool then renders again, and errors raised in a worker arrive as themselves."""
    source, slow = slow_render()
    quick = POLICY.resolve(POLICY.parse({"w": "32", "format": "webp"}), probe(source))

    async def scenario():
        pool = RenderPool(2, 60.0, max_memory=BUDGET)
        pool.start()
        try:
            assert (await pool.render(source, quick)).width == 32
            before = pool.pids()
            assert len(before) == 2
            started = time.monotonic()
            with pytest.raises(RenderTimeout, match="render_timeout"):
                await pool.render(source, slow, time_limit=0.2)
            assert time.monotonic() - started < 10  # abandoned, not waited for
            assert pool.restarts == 1
            # Killed, not finishing their render: that would take seconds longer than this.
            assert wait_until(lambda: all(gone(pid) for pid in before), 3.0), "the timed-out workers still run"
            out = await pool.render(source, quick)  # the new pool works
            assert decode(out.data).size == (32, 32)
            assert set(pool.pids()).isdisjoint(before)
            with pytest.raises(RenderOverBudget) as caught:
                await pool.render(png_claiming(9000, 9000), quick)
            assert caught.value.budget == BUDGET
            hashes = await asyncio.gather(*(pool.placeholder(source) for _ in range(4)))
            assert len(set(hashes)) == 1 and pool.restarts == 1
        finally:
            pool.close()

    asyncio.run(scenario())


def test_renders_caught_in_a_killed_pool_are_made_again():
    source, slow = slow_render()
    _, medium = slow_render("png", 1500)  # most of a second: still running when the other times out

    async def scenario():
        pool = RenderPool(2, 60.0, max_memory=BUDGET)
        pool.start()
        try:
            bystander = asyncio.ensure_future(pool.render(source, medium))
            await asyncio.sleep(0)  # the bystander is submitted first
            with pytest.raises(RenderTimeout):
                await pool.render(source, slow, time_limit=0.1)
            out = await bystander  # its worker was killed with the pool; it was made again
            assert (out.width, out.height) == (1500, 1500)
        finally:
            pool.close()

    asyncio.run(scenario())


CLOSE_THEN_EXIT = """
import asyncio, os, sys
from casimg.render_pool import RenderPool
from casimg.variants import VariantSpec

async def main():
    pool = RenderPool(2, 60.0, max_memory=2**29)
    pool.start()
    with open(sys.argv[1], "rb") as source:
        await pool.render(source.read(), VariantSpec(w=8, format="png"))
    pool.close()
    os._exit(0)  # at once, as a `serve --processes N` child ends: no atexit handler, no thread joined

asyncio.run(main())
"""


def test_a_closed_pool_leaves_no_semaphores_to_the_resource_tracker(tmp_path):
    """The pool's queues hold named semaphores, unlinked when the queues are freed: close() returns only
    once they can be (its workers reaped, its thread ended), so a process that exits right after leaves
    none behind, of which the resource tracker would warn on stderr."""
    source = tmp_path / "small.png"
    source.write_bytes(encode(Image.new("RGB", (64, 48), RED), "PNG"))
    # Run to the end of stderr, which the resource tracker shares: its warning, if any, is in it.
    done = subprocess.run([sys.executable, "-c", CLOSE_THEN_EXIT, str(source)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert "leaked semaphore" not in done.stderr, done.stderr


# --- placeholders ----------------------------------------------------------------------------------


def thumbhash_to_image(hash_: bytes) -> Image.Image:
    """A ThumbHash decoder written from the format's description, to check what the encoder wrote."""
    header24 = hash_[0] | hash_[1] << 8 | hash_[2] << 16
    header16 = hash_[3] | hash_[4] << 8
    l_dc, l_scale = (header24 & 63) / 63, (header24 >> 18 & 31) / 31
    p_dc, q_dc = (header24 >> 6 & 63) / 31.5 - 1, (header24 >> 12 & 63) / 31.5 - 1
    has_alpha, landscape = header24 >> 23, header16 >> 15
    p_scale, q_scale = (header16 >> 3 & 63) / 63, (header16 >> 9 & 63) / 63
    l_max = 5 if has_alpha else 7
    lx_raw, ly_raw = (l_max, header16 & 7) if landscape else (header16 & 7, l_max)
    lx, ly = max(3, lx_raw), max(3, ly_raw)
    a_dc, a_scale = ((hash_[5] & 15) / 15, (hash_[5] >> 4) / 15) if has_alpha else (1.0, 0.0)
    nibbles = [(byte >> shift) & 15 for byte in hash_[6 if has_alpha else 5:] for shift in (0, 4)]

    def channel(nx, ny, scale):
        terms = []
        for cy in range(ny):
            cx = 0 if cy else 1
            while cx * ny < nx * (ny - cy):
                terms.append((cx, cy, (nibbles.pop(0) / 7.5 - 1) * scale))
                cx += 1
        return terms

    l_ac, p_ac, q_ac = channel(lx, ly, l_scale), channel(3, 3, p_scale * 1.25), channel(3, 3, q_scale * 1.25)
    a_ac = channel(5, 5, a_scale) if has_alpha else []
    ratio = lx_raw / ly_raw
    w, h = (32, round(32 / ratio)) if ratio > 1 else (round(32 * ratio), 32)
    out = Image.new("RGBA", (w, h))
    for y in range(h):
        for x in range(w):
            def value(dc, terms, x=x, y=y):
                return dc + sum(f * math.cos(math.pi / w * (x + 0.5) * cx) * math.cos(math.pi / h * (y + 0.5) * cy) * 2
                                for cx, cy, f in terms)
            lum, p, q, a = value(l_dc, l_ac), value(p_dc, p_ac), value(q_dc, q_ac), value(a_dc, a_ac)
            b = lum - 2 / 3 * p
            r = (3 * lum - b + q) / 2
            out.putpixel((x, y), tuple(max(0, min(255, round(255 * c))) for c in (r, r - q, b, a)))
    return out


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    a, b = a.convert("RGB"), b.convert("RGB").resize(a.size, Image.Resampling.BOX)
    return sum(abs(x - y) for x, y in zip(a.tobytes(), b.tobytes(), strict=True)) / len(a.tobytes())


def test_placeholder_is_a_few_dozen_bytes_that_decode_to_a_blur_of_the_picture():
    picture = Image.linear_gradient("L").resize((1000, 600)).convert("RGB")
    ImageDraw.Draw(picture).ellipse((100, 100, 400, 500), fill=RED)
    text = ph.placeholder(encode(picture, "JPEG", quality=90))
    raw = base64.b64decode(text, validate=True)
    assert 16 <= len(raw) <= 40 and len(text) <= 56
    back = thumbhash_to_image(raw)
    assert back.size == (32, 18)  # the aspect ratio in the format's steps: 7:4 for 5:3
    # The same picture, blurred: nearer to it than to its mirror images (28 against 44 and 125 of 255).
    own = mean_difference(back, picture)
    assert own < 0.75 * mean_difference(back, picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert own < 0.5 * mean_difference(back, picture.transpose(Image.Transpose.FLIP_TOP_BOTTOM))
    # Upright: a portrait stored as landscape with EXIF 6 gives a portrait placeholder.
    portrait = thumbhash_to_image(base64.b64decode(ph.placeholder(stored_with_orientation(quadrants(40, 80), 6))))
    assert portrait.size[0] < portrait.size[1] and close(portrait.getpixel((4, 4)), RED, 90)


def test_placeholder_of_a_transparent_image_keeps_its_alpha():
    im = Image.new("RGBA", (60, 60), (0, 0, 0, 0))
    ImageDraw.Draw(im).rectangle((20, 20, 40, 40), fill=(0, 0, 255, 255))
    raw = base64.b64decode(ph.placeholder(encode(im, "PNG")))
    assert raw[2] & 0x80  # the has-alpha bit
    back = thumbhash_to_image(raw)
    assert back.getpixel((1, 1))[3] < 80 and back.getpixel((16, 16))[3] > 150
    # Transparent pixels count as the average visible colour, so the colour terms are all blue.
    assert close(back.getpixel((1, 1)), BLUE, 90)
    assert close(back.getpixel((16, 16)), BLUE, 90)


def test_the_encoder_refuses_what_the_format_cannot_hold():
    with pytest.raises(ValueError, match="100x100"):
        ph.encode(Image.new("RGB", (101, 10)))


def test_a_worker_that_dies_is_replaced_and_its_render_answers_unavailable():
    """A worker killed from outside (as the kernel's out-of-memory killer would) breaks the pool: the
    work is tried once more on a new pool, then refused as Unavailable (a 503); the pool goes on."""
    async def scenario():
        pool = RenderPool(1, 60.0, max_memory=BUDGET)
        pool.start()
        try:
            with pytest.raises(Unavailable, match="died"):
                await pool.run(os._exit, 1)
            assert pool.restarts == 2
            assert len(await pool.placeholder(encode(quadrants(), "PNG"))) > 20
        finally:
            pool.close()
        with pytest.raises(Unavailable, match="not running"):
            await pool.placeholder(b"")

    asyncio.run(scenario())


def test_an_animation_kept_at_its_own_size_has_each_frame_once():
    """Frames after a GIF's first decode as RGB: at the output's own size nothing copies them, and the
    open file itself went to the encoder, which read all of its frames again for each (IndexError)."""
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=50)
    spec = VariantPolicy().resolve(VariantSpec(format="gif", animated=True), probe(out.getvalue()))
    rendered = render(out.getvalue(), spec, max_memory=2**30)
    with Image.open(io.BytesIO(rendered.data)) as im:
        assert im.n_frames == 3
        colours = []
        for index in range(3):
            im.seek(index)
            colours.append(im.convert("RGB").getpixel((4, 4)))
    assert colours == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
