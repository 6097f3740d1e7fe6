"""/openapi.json documents exactly the routes the app serves, with the methods the handlers implement."""

from __future__ import annotations

import re
from importlib.metadata import version

import casimg
from casimg.app import routes
from casimg.openapi import openapi_document

METHODS = ("get", "head", "post", "put", "patch", "delete")


def _as_openapi_path(pattern: str) -> str:
    path = pattern.rstrip("$").replace("\\.", ".").replace("/?", "")
    return re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", path)


def test_document_paths_and_methods_match_the_routes():
    document = openapi_document()
    served = {}
    for spec in routes(services=None):  # type: ignore[arg-type]
        handler = spec.handler_class
        implemented = {m for m in METHODS if getattr(handler, m) is not getattr(handler.__mro__[-2], m)}
        served[_as_openapi_path(spec.regex.pattern)] = implemented
    documented = {path: set(item) & set(METHODS) for path, item in document["paths"].items()}
    assert documented == served


def test_every_operation_documents_its_responses_and_errors_use_problem_json():
    for path, item in openapi_document()["paths"].items():
        for method, operation in item.items():
            assert operation["responses"], f"{method} {path}"
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    assert "application/problem+json" in response["content"], f"{method} {path} {status}"


def test_one_version_number_for_the_package_and_the_api_document():
    assert version("casimg") == casimg.__version__ == openapi_document()["info"]["version"]


def test_the_variant_parameter_lists_the_presets_given():
    def variant_schemas(document):
        return [param["schema"] for item in document["paths"].values() for operation in item.values()
                for param in operation.get("parameters", []) if param["name"] == "variant"]

    assert all(schema["enum"] == ["thumb", "hero"] for schema in variant_schemas(openapi_document(["thumb", "hero"])))
    assert all("enum" not in schema for schema in variant_schemas(openapi_document()))  # none: no empty enum
