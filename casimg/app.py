"""The HTTP application: the route table and the Tornado ``Application`` built on it."""

from __future__ import annotations

import re

import tornado.web

from casimg import handlers
from casimg.config import Settings
from casimg.gallery import gallery_routes
from casimg.services import Services


def routes(services: Services, with_metrics: bool = True) -> list[tornado.web.URLSpec]:
    """The route table; /openapi.json documents exactly these (tests/test_openapi.py holds them together).

    Each handler gets its route's name, the label its requests are counted under in /metrics.
    """
    table: list[tuple[str, type[handlers.BaseHandler]]] = [
        (r"/healthz", handlers.HealthHandler),
        (r"/readyz", handlers.ReadyHandler),
        (r"/openapi\.json", handlers.OpenApiHandler),
        (r"/api/images/?", handlers.ImagesHandler),
        (r"/api/jobs/(?P<job_id>[^/]+)", handlers.JobHandler),
        (r"/api/image", handlers.ImageHandler),
        (r"/api/image/meta", handlers.ImageMetaHandler),
        (r"/api/blobs/(?P<digest>[0-9a-f]{64})", handlers.BlobHandler),
        (r"/api/blobs/(?P<digest>[0-9a-f]{64})/urls", handlers.BlobUrlsHandler),
        (r"/api/key", handlers.KeyHandler),
    ]
    if with_metrics:
        table.append((r"/metrics", handlers.MetricsHandler))
    return [
        tornado.web.url(pattern, handler, {"services": services, "route": route_name(pattern)})
        for pattern, handler in table
    ]


def route_name(pattern: str) -> str:
    """The route as a label: /api/images/? -> /api/images, /api/jobs/(?P<job_id>...) -> /api/jobs/{job_id}."""
    name = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern).replace("\\.", ".")
    return name.removesuffix("/?")


def make_app(settings: Settings, services: Services) -> tornado.web.Application:
    """The API, and the gallery at / unless CASIMG_UI=off; /metrics is part of it unless CASIMG_METRICS_PORT
    gives metrics a listener of their own."""
    table: list[tornado.web.URLSpec] = routes(services, with_metrics=not settings.metrics_port)
    if settings.ui:
        table += [tornado.web.url(pattern, handler, args) for pattern, handler, args in gallery_routes(services)]
    return tornado.web.Application(
        table,
        default_handler_class=handlers.NotFoundHandler,
        default_handler_args={"services": services},
        compress_response=False,
        log_function=handlers.log_request,
    )


def make_metrics_app(services: Services) -> tornado.web.Application:
    """/metrics alone, for CASIMG_METRICS_PORT."""
    return tornado.web.Application(
        [tornado.web.url(r"/metrics", handlers.MetricsHandler, {"services": services, "route": "/metrics"})],
        default_handler_class=handlers.NotFoundHandler,
        default_handler_args={"services": services},
        log_function=handlers.log_request,
    )
