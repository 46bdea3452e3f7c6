# The OpenAPI 3.1 document of the control plane's REST API, assembled from its route
# records alone: each Route names the type its request body decodes as, the type of
# each success answer and its query parameters, and every schema is derived
# (msgspec.json.schema_components) from those msgspec types, the same ones the
# handlers decode and encode, so the document and the behaviour cannot drift apart.
# Every error is application/problem+json (the `Problem` type given to the builder).
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Generic, NamedTuple, TypeVar

import msgspec
import msgspec._json_schema

from config.values import AMOUNT_PATTERN, Money, Percent, Rate, Scope, Timestamp

COMPONENTS = "#/components/schemas/"
JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
_PATH_PARAMETER = re.compile(r"\{(\w+)\}")
_DESCRIPTIONS = {200: "OK", 201: "Created", 204: "No Content"}


Item = TypeVar("Item")


class Page(msgspec.Struct, Generic[Item]):
    """A listing: its `items`, in the listing's order."""

    items: list[Item]


class Query(NamedTuple):
    """A query parameter: its `name`, JSON Schema (of the value as read: `integer`,
    `number`, an enum, ...), what it means, and whether it must be given."""

    name: str
    schema: dict
    description: str = ""
    required: bool = False


class Content(NamedTuple):
    """A body that is not JSON: its media type and JSON Schema (`text/plain` metrics)."""

    media_type: str
    schema: dict


class Route(NamedTuple):
    """One route of the API: `method` and `path` (aiohttp's template, `{name}` for a
    path parameter), its `handler` and `summary`; `answers`: each status it answers
    with: a success's body type (None: no body, a Content: not JSON), or for a
    problem (application/problem+json) when it is answered; `body`:
    the type the request body decodes as (None: it takes none), also accepted as one
    JSON text per line in each of `ndjson` media types; `query`: its query parameters."""

    method: str
    path: str
    handler: Callable
    summary: str
    answers: Mapping[int, object]
    body: object = None
    query: tuple[Query, ...] = ()
    ndjson: tuple[str, ...] = ()

    @property
    def path_parameters(self) -> list[str]:
        return _PATH_PARAMETER.findall(self.path)


# Query parameters several listings share.
AFTER = Query("after", {"type": "integer", "minimum": 0, "default": 0}, "list only what comes after this `seq`")
LIMIT = Query("limit", {"type": "integer", "minimum": 1, "default": 100},
              "at most this many items (more than 1000 is read as 1000)")


def _schema_hook(kind) -> dict:
    # The configuration value types, as they are written in a body and encoded in an
    # answer (their str()); `object`: any JSON value.
    if kind is object:
        return {"description": "any JSON value"}
    if kind is Money:
        return {"type": ["string", "number"], "pattern": AMOUNT_PATTERN, "minimum": 0,
                "description": "an amount of money >= 0, a decimal exact to 9 places (`\"2.50\"`)"}
    if issubclass(kind, Percent):
        return {"type": "string", "pattern": r"^[+-]?[0-9]+(\.[0-9]+)?\s*%$",
                "description": f"a percentage like `25%`, from {kind.MIN:g}% to {kind.MAX:g}%"}
    if kind is Timestamp:
        return {"type": "string", "format": "date-time", "description": "RFC 3339 with a timezone"}
    if kind is Rate:
        return {"type": "string", "pattern": r"^[0-9]+\s*req\s*/\s*[a-z0-9]+$", "description": "a rate like `5req/sec`"}
    if kind is Scope:
        return {"type": "string", "description": "`global`, `tier: NAME` or `customer: ID`"}
    raise NotImplementedError(kind)


# msgspec writes a field's default into its schema with to_builtins, which has no
# enc_hook for the configuration value types (Money(0), Band(2.0), Scope.GLOBAL):
# here they are written as they are encoded, their str().
_defaults_encoded = functools.partial(msgspec.to_builtins, enc_hook=str)


def _schema_components(types: Sequence[object]) -> tuple[tuple[dict, ...], dict]:
    plain = msgspec._json_schema.to_builtins
    msgspec._json_schema.to_builtins = _defaults_encoded
    try:
        return msgspec.json.schema_components(types, schema_hook=_schema_hook,
                                              ref_template=COMPONENTS + "{name}")
    finally:
        msgspec._json_schema.to_builtins = plain


def openapi_document(routes: Sequence[Route], problem: type, *, title: str,
                     token_problems: Callable[[Route], Mapping[int, str]] = lambda route: {},
                     key_from_path: Sequence[type] = (),
                     webhooks: Mapping[str, tuple[str, list[dict], type]] = {}) -> dict:
    """The OpenAPI 3.1 document of `routes`: path parameters, query parameters, the
    request body and each answer, a success's with its schema, a problem's
    (application/problem+json) as `problem`. `token_problems(route)`: the problems
    a route answers a request without a bearer token it accepts (none: the route is
    open). `key_from_path`: entry types whose `key` a body may leave out (the
    path's). `webhooks`: name -> (summary, header parameters, body type) of what
    the service POSTs out (OpenAPI's `webhooks`)."""
    types: list[object] = [problem]
    for route in routes:
        types += [kind for kind in (route.body, *route.answers.values()) if kind is not None
                  and not isinstance(kind, (Content, str))]
    types += [body for _, _, body in webhooks.values()]
    schemas, components = _schema_components(types)
    schema_of = dict(zip(map(id, types), schemas))
    for entry_type in key_from_path:
        schema = components[schema_of[id(entry_type)]["$ref"].removeprefix(COMPONENTS)]
        schema["required"] = [name for name in schema.get("required", ()) if name != "key"]

    def content(kind, media_type=JSON):
        if isinstance(kind, Content):
            return {kind.media_type: {"schema": kind.schema}}
        return {media_type: {"schema": schema_of[id(kind)]}}

    paths: dict = {}
    for route in routes:
        operation = _operation(route, content, problem, token_problems(route))
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    outgoing = {name: {"post": {
        "summary": summary, "parameters": headers,
        "requestBody": {"required": True, "content": content(body)},
        "responses": {"2XX": {"description": "delivered; anything else is retried with backoff"}}}}
        for name, (summary, headers, body) in webhooks.items()}
    document = {"openapi": "3.1.0", "info": {"title": title, "version": "1"}, "paths": paths, "webhooks": outgoing,
                "components": {"schemas": components, "securitySchemes": {"bearer": {
                    "type": "http", "scheme": "bearer",
                    "description": "a token of a scope that allows the route (`admin`: every route)"}}}}
    return msgspec.json.decode(msgspec.json.encode(document))       # JSON values only (no tuple defaults)


def _operation(route: Route, content: Callable, problem: type, token_problems: Mapping[int, str]) -> dict:
    # One route's operation; `content(kind[, media type])` is the content of a body of `kind`.
    problems = {**token_problems,
                **({413: "the body is larger than the control plane takes"} if route.body is not None else {})}
    responses = {}
    for status, kind in sorted({**problems, **route.answers}.items()):
        if isinstance(kind, str):
            responses[str(status)] = {"description": kind, "content": content(problem, PROBLEM_JSON)}
        else:
            responses[str(status)] = {"description": _DESCRIPTIONS.get(status, "success"),
                                      **({"content": content(kind)} if kind is not None else {})}
    responses["default"] = {"description": "the control plane failed (500) or its store is unavailable (503)",
                            "content": content(problem, PROBLEM_JSON)}
    operation: dict = {"summary": route.summary, "responses": responses}
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in route.path_parameters]
    parameters += [{"name": query.name, "in": "query", "required": query.required, "schema": query.schema,
                    **({"description": query.description} if query.description else {})}
                   for query in route.query]
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        body = content(route.body)
        for media_type in route.ndjson:
            body[media_type] = {"schema": {"type": "string", "description": "one JSON text per line, each as an "
                                           "item of the application/json array"}}
        operation["requestBody"] = {"required": True, "content": body}
    if token_problems:
        operation["security"] = [{"bearer": []}]
    return operation

