# The control plane's REST API (aiohttp, JSON, under /v1): the catalog, customers' API
# keys, event ingest, margins, guard actions, the webhook outbox and tokens. Every /v1
# call needs a bearer token whose scope allows the route (control_plane.tokens); errors are
# application/problem+json. /healthz and /openapi.json are open. The handlers only
# translate HTTP to the catalog, key, ingest, margin and outbox functions.
from __future__ import annotations

import secrets
import time
import typing
from collections.abc import Callable
from typing import Annotated, Literal

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from config.catalog_file import ENTRY_TYPES, SECTIONS, document_of, parse_catalog_entry
from config.edge_state_file import EdgeStateFile
from config.errors import ConfigError, raise_if_any
from config.schema import Guard
from config.watched_file import ReloadErrorCounter
from control_plane import quota_leases
from control_plane.catalog import check_entry_references, referrers_of
from control_plane.edge_feed import LONG_POLL_MAX_S, EdgeChanges, EdgeFeed
from control_plane.ingest import (
    Batch,
    BatchError,
    CostEvent,
    IngestReport,
    Rerated,
    UsageEvent,
    split_batch,
)
from control_plane.intake import Intake
from control_plane.margins import CustomerMargin, customer_margins
from control_plane.openapi import AFTER, LIMIT, Content, Page, Query, Route, openapi_document
from control_plane.pnl import ProfitAndLoss, profit_and_loss
from control_plane.quota_leases import Lease, LeaseRequest, LeaseReturn, ThrottleRequest, ThrottleTokens
from control_plane.rating import CurrentRater
from control_plane.store import (
    COST,
    CREATED,
    UNCHANGED,
    UPDATED,
    USAGE,
    WEBHOOK_STATUSES,
    Action,
    ApiKey,
    AuditEntry,
    DeadLetter,
    Store,
    StoreError,
    Token,
    WebhookDelivery,
)
from control_plane.tokens import ADMIN, SCOPES, Principal, create_token, scopes_allowing, sha256_hex
from control_plane.webhooks import (
    ID_HEADER,
    LEVEL_CHANGED,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    LevelChanged,
    WebhookMetrics,
)

MAX_BODY_BYTES = 16 * 1024 * 1024
API_KEY_PREFIX = "ak_live_"
API_KEY_SHOWN_PREFIX_CHARS = 12          # what a listing shows of a key: enough to tell keys apart
NDJSON = ("application/x-ndjson", "application/ndjson")
# The configuration value types (Money, Percent, Rate, Timestamp ...) go out as their str().
_encode = msgspec.json.Encoder(enc_hook=str).encode
STORE = web.AppKey("store", object)
CLOCK = web.AppKey("clock", object)
OPENAPI = web.AppKey("openapi", dict)
GUARDS = web.AppKey("guards", object)
METRICS = web.AppKey("metrics", object)
FEED = web.AppKey("feed", EdgeFeed)
REPORTING = web.AppKey("reporting", object)
# Who called (the bearer token's Principal), for the audit trail.
PRINCIPAL = web.RequestKey("principal", Principal)
WEBHOOKS = web.AppKey("webhooks", object)
RATER = web.AppKey("rater", CurrentRater)
INTAKE = web.AppKey("intake", Intake)


class ControlPlaneMetrics:
    """The control plane's Prometheus metrics, on a registry of its own:
    `config_reload_errors_total{file}` (rejected reloads; the old file stays in force),
    `meter_dead_letters_total` (events of the meter stream put in the dead letters),
    `events_unrated_total` (events kept but not rated)
    and the webhook deliveries' (see WebhookMetrics)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        # A WatchedFile's on_reload_error: counts one rejected reload of a file.
        self.count_reload_error = ReloadErrorCounter(self.registry)
        self.webhooks = WebhookMetrics(self.registry)
        self.unrated = Counter("aforo_events_unrated_total", "Events kept but not rated (an unknown metric, no "
                               "subscription yet), listed at GET /v1/events/unrated.", registry=self.registry)
        self.dead_letters = Counter("aforo_meter_dead_letters_total", "Events of the meter stream that could "
                                    "not be taken in, kept in the dead letters (GET /v1/dead-letters).",
                                    registry=self.registry)


class Shown(msgspec.Struct, forbid_unknown_fields=True):
    """Base of what an answer shows (its schema allows no other field)."""


class ProblemAt(Shown):
    message: str
    path: str                       # a JSON path in the body, `$.charges[0].price` (`$`: the body itself)


class ShownReferrer(Shown):
    kind: str
    key: str
    path: str


class Problem(Shown, omit_defaults=True):
    """An error (RFC 9457 problem details): `title` the status's, `detail` what went
    wrong; with `errors` each problem of an invalid body at its JSON path, `path`
    the one of a body, `needed_scope` and `scope` the token's when it may not call
    the route, `referrers` the live entries still naming one to delete."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[ProblemAt] | None = None
    path: str | None = None
    needed_scope: str | None = None
    scope: str | None = None
    referrers: list[ShownReferrer] | None = None


def problem(status: int, detail: str, **extra) -> web.Response:
    body = Problem("about:blank", _TITLES.get(status, "Error"), status, detail, **extra)
    return web.Response(status=status, body=_encode(body), content_type="application/problem+json")


_TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           409: "Conflict", 413: "Content Too Large", 415: "Unsupported Media Type",
           422: "Unprocessable Content", 500: "Internal Server Error", 503: "Service Unavailable"}


def json_response(value, status=200) -> web.Response:
    return web.Response(status=status, body=_encode(value), content_type="application/json")


@web.middleware
async def _problems(request, handler):
    # Every error leaves as problem+json; an unexpected one is logged, never leaked.
    try:
        response = await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        default = f"{error.status}: {error.reason}"
        return problem(error.status, error.reason if not error.text or error.text == default else error.text)
    except StoreError as error:
        request.app.logger.error("store failed: %s", error)
        if error.permanent:
            return problem(422, f"the store cannot keep what was sent ({error}); sending it again will not help")
        return problem(503, "the store is unavailable; retry the request")
    except Exception:
        request.app.logger.exception("request failed")
        return problem(500, "the control plane failed to handle this request")
    return response


@web.middleware
async def _scoped_tokens(request, handler):
    # Looked up in the store on every request: a revoked token fails the next one.
    if request.path.startswith("/v1/"):
        header = request.headers.get("Authorization", "")
        secret = header[7:].strip() if header[:7].lower() == "bearer " else ""
        token = await request.app[STORE].live_token(sha256_hex(secret)) if secret else None
        if token is None:
            response = problem(401, "a bearer token is required (unknown or revoked tokens are refused)")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        request[PRINCIPAL] = Principal(token.id, token.name, token.scope)
        resource = request.match_info.route.resource
        if resource is not None:             # an unknown path or method answers 404 / 405 as usual
            needed = scopes_allowing(request.method, resource.canonical)
            if token.scope not in needed:
                return problem(403, f"`{request.method} {resource.canonical}` needs a token of the "
                                    f"`{needed[0]}` scope; this one (`{token.id}`) has `{token.scope}`",
                               needed_scope=needed[0], scope=token.scope)
    return await handler(request)


# -- catalog ---------------------------------------------------------------------------

def _kind(request):
    # The catalog kind of the collection the route serves: `/v1/<section>...`.
    return _KIND_OF_SECTION[request.match_info.route.resource.canonical.split("/")[2]]


_KIND_OF_SECTION = dict(SECTIONS)


# What a PUT answers, per kind: the entry as kept, and whether it was created, updated or unchanged.
_WRITTEN = {kind: msgspec.defstruct(f"{entry_type.__name__}Written", [("result", Literal[CREATED, UPDATED, UNCHANGED])],
                                    bases=(entry_type,), kw_only=True)
            for kind, entry_type in ENTRY_TYPES.items()}


async def _put_entry(request):
    kind = _kind(request)
    key = request.match_info["key"]
    document = await _json_body(request)
    if not isinstance(document, dict):
        return problem(422, "the body must be a JSON object")
    if document.setdefault("key", key) != key:
        return problem(422, f"the body's key `{document['key']}` is not the key in the path `{key}`")
    try:
        # The rules `aforo apply` holds a file's entries to, paths from the body's top.
        entry = parse_catalog_entry(kind, document)
        raise_if_any(await check_entry_references(request.app[STORE], kind, document_of(entry)))
    except ConfigError as error:
        return _invalid_entry(kind, error)
    outcome = await request.app[STORE].put_catalog(kind, key, document_of(entry), author=request[PRINCIPAL].author)
    if outcome != UNCHANGED:
        request.app[FEED].changed()
    written = _WRITTEN[kind](**msgspec.structs.asdict(entry), result=outcome)
    return json_response(written, 201 if outcome == CREATED else 200)


def _invalid_entry(kind, error: ConfigError) -> web.Response:
    # 422 naming each problem's JSON path in the body; `detail` tells the first.
    errors = [ProblemAt(one.message, one.path or "$") for one in error.errors]
    detail = f"invalid {kind}: {error.message}" + (f" - at `{error.path}`" if error.path else "")
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    return problem(422, detail, errors=errors)


async def _get_entry(request):
    kind = _kind(request)
    key = request.match_info["key"]
    document = await request.app[STORE].get_catalog(kind, key)
    if document is None:
        return problem(404, f"no {kind} `{key}`")
    return json_response({"key": key, **document})


async def _list_entries(request):
    kind = _kind(request)
    entries = await request.app[STORE].list_catalog(kind)
    return json_response({"items": [{"key": key, **document} for key, document in entries]})


async def _delete_entry(request):
    kind = _kind(request)
    key = request.match_info["key"]
    # Refused while a live entry names it: a plan or subscription would be left naming nothing.
    if referrers := await referrers_of(request.app[STORE], kind, key):
        named = ", ".join(f"{referrer.kind} `{referrer.key}` (at `{referrer.path}`)" for referrer in referrers)
        return problem(409, f"{kind} `{key}` is still named by {named}; change or delete those first",
                       referrers=[ShownReferrer(*referrer) for referrer in referrers])
    if not await request.app[STORE].delete_catalog(kind, key, author=request[PRINCIPAL].author):
        return problem(404, f"no {kind} `{key}`")
    request.app[FEED].changed()
    return web.Response(status=204)


# -- API keys ----------------------------------------------------------------------------

class ShownApiKey(Shown):
    """A customer's API key as listed: never the key itself (its `prefix` tells keys apart)."""

    id: str
    customer_id: str
    prefix: str
    created_at: float
    revoked_at: float | None


class CreatedApiKey(ShownApiKey):
    key: str                        # shown this once


def _shown(key: ApiKey) -> ShownApiKey:
    return ShownApiKey(key.id, key.customer_id, key.prefix, key.created_at, key.revoked_at)


async def _create_api_key(request):
    customer_id = request.match_info["customer"]
    store = request.app[STORE]
    if await store.get_catalog("customer", customer_id) is None:
        return problem(404, f"no customer `{customer_id}`")
    secret = API_KEY_PREFIX + secrets.token_urlsafe(24)
    key = ApiKey("key_" + secrets.token_hex(8), customer_id, secret[:API_KEY_SHOWN_PREFIX_CHARS],
                 sha256_hex(secret), request.app[CLOCK]())
    await store.add_api_key(key, author=request[PRINCIPAL].author)
    request.app[FEED].changed((customer_id,))
    # The only time the key itself is ever shown.
    return json_response(CreatedApiKey(*msgspec.structs.astuple(_shown(key)), secret), 201)


async def _list_api_keys(request):
    keys = await request.app[STORE].api_keys(request.match_info["customer"], request.query.get("prefix", ""))
    return json_response(Page([_shown(key) for key in keys]))


async def _revoke_api_key(request):
    customer_id = await request.app[STORE].revoke_api_key(request.match_info["key_id"], request.app[CLOCK](),
                                                          author=request[PRINCIPAL].author)
    if customer_id is None:
        return problem(404, f"no active API key `{request.match_info['key_id']}`")
    request.app[FEED].changed((customer_id,))
    return web.Response(status=204)


# -- tokens ----------------------------------------------------------------------------

class NewToken(msgspec.Struct, forbid_unknown_fields=True):
    """A token to create: who or what uses it (`name`) and its `scope`. (The handler
    checks each field itself, to name the one in a problem's `path`.)"""

    name: Annotated[str, msgspec.Meta(pattern=r"\S")]
    scope: Literal[SCOPES] = ADMIN


class CreatedToken(Token, kw_only=True):
    token: str                      # the token itself, shown this once


async def _create_token(request):
    body = await _json_body(request)
    if not isinstance(body, dict):
        return problem(422, "the body must be a JSON object: {\"name\": ..., \"scope\": ...}")
    name, scope = body.get("name"), body.get("scope", ADMIN)
    if not isinstance(name, str) or not name.strip():
        return problem(422, "a token needs a `name` (a non-empty string) - at `$.name`", path="$.name")
    if scope not in SCOPES:
        return problem(422, f"`scope` is one of {', '.join(SCOPES)}, got {_encode(scope).decode()} - at `$.scope`",
                       path="$.scope")
    unknown = sorted(set(body) - {"name", "scope"})
    if unknown:
        return problem(422, f"unknown field `{unknown[0]}` - at `$.{unknown[0]}`", path=f"$.{unknown[0]}")
    token, secret = await create_token(request.app[STORE], name, request.app[CLOCK](), scope,
                                       author=request[PRINCIPAL].author)
    # The only time the token itself is ever shown.
    return json_response(CreatedToken(**msgspec.structs.asdict(token), token=secret), 201)


async def _list_tokens(request):
    return json_response(Page(await request.app[STORE].tokens()))


async def _revoke_token(request):
    if await request.app[STORE].revoke_token(request.match_info["token_id"], request.app[CLOCK](),
                                             author=request[PRINCIPAL].author) is None:
        return problem(404, f"no live token `{request.match_info['token_id']}`")
    return web.Response(status=204)


# -- ingest ----------------------------------------------------------------------------

def _ingest_handler(kind):
    async def handle(request):
        content_type = request.content_type
        if content_type != "application/json" and content_type not in NDJSON:
            return problem(415, "send events as application/json (an array, or {\"events\": [...]}) "
                                "or application/x-ndjson (one event per line)")
        body = await request.read()
        try:
            events = split_batch(body, ndjson=content_type != "application/json")
        except BatchError as error:
            return problem(400, str(error))
        report = await request.app[INTAKE].take(kind, events, request.headers.get("X-Aforo-Source", "api"))
        return json_response(report)
    return handle


def _page(request):
    # (after seq, limit) from the query, or None when they are not whole numbers, `after`
    # is negative or `limit` below 1 (more than 1000 is read as 1000).
    try:
        after, limit = int(request.query.get("after", "0")), int(request.query.get("limit", "100"))
    except ValueError:
        return None
    return (after, min(limit, 1000)) if after >= 0 and limit >= 1 else None


_NOT_A_PAGE = "`after` and `limit` are whole numbers (`after` >= 0, `limit` >= 1)"


def _listing(name: str, record, *, seq: bool = True, shown_as: dict | None = None):
    # The Struct of what a listing shows of each `record` (a NamedTuple of the store):
    # its `seq` first (when `seq`), then its fields, each of `shown_as` (field ->
    # (name, type)) shown under another name or type.
    fields = [("seq", int)] if seq else []
    fields += [(shown_as or {}).get(field, (field, kind)) for field, kind in typing.get_type_hints(record).items()]
    return msgspec.defstruct(name, fields, bases=(Shown,))


async def _listed(request, fetch, shown=None):
    # A listing paged by seq: `fetch(after, limit)` from the store, each item `shown`
    # (a tuple's fields as arguments), or as it is (None).
    if (page := _page(request)) is None:
        return problem(400, _NOT_A_PAGE)
    return json_response(Page([item if shown is None else shown(*item) for item in await fetch(*page)]))


class UnratedEvent(Shown):
    """An event kept but not rated, with why; `event` as it was sent."""

    seq: int
    kind: Literal[USAGE, COST]
    customer_id: str
    event_id: str
    reason: str
    ingested_at: float
    event: dict


async def _unrated_events(request):
    return await _listed(request, request.app[STORE].unrated_events, lambda seq, reason, event: UnratedEvent(
        seq, event.kind, event.customer_id, event.event_id, reason, event.ingested_at,
        msgspec.json.decode(event.payload)))


async def _rate_unrated(request):
    return json_response(await request.app[INTAKE].rate_unrated())


class LateEvent(Shown):
    """An event that arrived more than 24 h behind its timestamp; `event` as it was sent."""

    kind: Literal[USAGE, COST]
    customer_id: str
    event_id: str
    occurred_at: float
    ingested_at: float
    event: dict


async def _late_events(request):
    try:
        since = float(request.query.get("since", "0"))
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        return problem(400, "`since` is epoch seconds and `limit` a whole number")
    if limit < 1:
        return problem(400, "`limit` is a whole number >= 1")
    if request.query.get("late") not in ("true", "1"):
        return problem(400, "list events with `late=true` (late events, for reconciliation)")
    events = await request.app[STORE].late_events(since, min(limit, 1000))
    return json_response(Page([LateEvent(event.kind, event.customer_id, event.event_id, event.occurred_at,
                                         event.ingested_at, msgspec.json.decode(event.payload))
                               for event in events]))


ListedDeadLetter = _listing("ListedDeadLetter", DeadLetter, shown_as={"event": ("event", str)})


async def _dead_letters(request):
    return await _listed(request, request.app[STORE].dead_letters, lambda seq, letter: ListedDeadLetter(
        seq, letter.source, letter.entry_id, letter.event.decode("utf-8", "replace"), letter.reason, letter.at))


ListedAction = _listing("ListedAction", Action)


async def _actions(request):
    customer = request.query.get("customer")
    return await _listed(request, lambda after, limit: request.app[STORE].actions(customer, after, limit),
                         lambda seq, action: ListedAction(seq, *action))


async def _audit(request):
    kind, key = request.query.get("kind"), request.query.get("key")
    return await _listed(request, lambda after, limit: request.app[STORE].audit(kind, key, after, limit))


ListedWebhook = _listing("ListedWebhook", WebhookDelivery, seq=False, shown_as={"body": ("payload", LevelChanged)})


class WebhookOutbox(Shown):
    """How many webhooks are in each status, and the deliveries listed."""

    counts: dict[Literal[WEBHOOK_STATUSES], int]
    items: list[ListedWebhook]


async def _webhooks(request):
    status = request.query.get("status")
    if status is not None and status not in WEBHOOK_STATUSES:
        return problem(400, f"`status` is one of {', '.join(WEBHOOK_STATUSES)}")
    if (page := _page(request)) is None:
        return problem(400, _NOT_A_PAGE)
    after, limit = page
    store = request.app[STORE]
    deliveries = await store.webhooks(status, after, limit)
    items = [ListedWebhook(*delivery._replace(body=msgspec.json.decode(delivery.body))) for delivery in deliveries]
    return json_response(WebhookOutbox(await store.webhook_counts(), items))


async def _json_body(request):
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="send a JSON body (application/json)")
    try:
        return msgspec.json.decode(await request.read())
    except msgspec.DecodeError as error:
        raise web.HTTPBadRequest(text=f"the body is not JSON: {error}") from None


# -- edge feed -------------------------------------------------------------------------

class EdgeState(Shown):
    """The edge state proxies decide from, at least as new as `version`."""

    version: str
    state: EdgeStateFile


async def _edge_state(request):
    feed = request.app[FEED]
    version = feed.version           # taken first: the state read is at least this new
    return json_response(EdgeState(version, await feed.state(request.app[CLOCK]())))


async def _edge_changes(request):
    try:
        wait_s = float(request.query.get("wait_s", "0"))
    except ValueError:
        return problem(400, "`wait_s` is a number of seconds")
    since = request.query.get("since", "")
    return json_response(await request.app[FEED].changes(since, wait_s, request.app[CLOCK]()))


async def _lease_quota(request):
    try:
        asked = msgspec.json.decode(await request.read(), type=LeaseRequest)
    except msgspec.DecodeError as error:
        return problem(422, f"invalid lease request: {error}")
    try:
        granted = await quota_leases.lease(request.app[STORE], await request.app[RATER].get(), asked,
                                           request.app[CLOCK]())
    except quota_leases.NoHardQuota as error:
        return problem(404, str(error))
    return json_response(granted)


async def _return_quota(request):
    try:
        returned = msgspec.json.decode(await request.read(), type=LeaseReturn)
    except msgspec.DecodeError as error:
        return problem(422, f"invalid lease return: {error}")
    await request.app[STORE].return_quota(returned.customer_id, returned.metric, returned.period_start,
                                          returned.units)
    return web.Response(status=204)


async def _take_throttle_tokens(request):
    try:
        asked = msgspec.json.decode(await request.read(), type=ThrottleRequest)
    except msgspec.DecodeError as error:
        return problem(422, f"invalid throttle request: {error}")
    return json_response(await quota_leases.take_tokens(request.app[STORE], asked, request.app[CLOCK]()))


async def _release_long_polls(app):
    app[FEED].close()


# -- service ---------------------------------------------------------------------------

class GuardsInForce(Shown):
    """The guard file in force: its `version` and `source`, how many times it was
    reloaded and how many reloads were rejected, the seconds since it was read, and
    its guards."""

    version: str
    source: str
    reloads: int
    reload_errors: int
    age_s: float
    guards: list[Guard]


async def _guards(request):
    guards = request.app[GUARDS]
    if guards is None:
        return problem(404, "no guard file is configured (`guards:` in the control plane settings, or "
                            "`aforo control-plane --guards FILE`)")
    guard_set = guards.value
    return json_response(GuardsInForce(guard_set.version, guard_set.source, guards.reloads, guards.reload_errors,
                                       guards.age_s(), list(guard_set.guards)))


async def _customer_margin(request):
    customer_id = request.match_info["customer"]
    store = request.app[STORE]
    if await store.get_catalog("customer", customer_id) is None:
        return problem(404, f"no customer `{customer_id}`")
    margins = await customer_margins(store, request.app[CLOCK](), customer_id, await request.app[RATER].get())
    if not margins:
        return problem(404, f"customer `{customer_id}` has no billable subscription now")
    return json_response(margins[0])


async def _pnl(request):
    margins = await customer_margins(request.app[STORE], request.app[CLOCK](), rater=await request.app[RATER].get())
    return json_response(profit_and_loss(margins, request.app[REPORTING]))


async def _metrics(request):
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class Health(Shown):
    status: Literal["ok"]


async def _health(request):
    await request.app[STORE].schema_version()
    return json_response(Health("ok"))


async def _openapi(request):
    return json_response(request.app[OPENAPI])


TEXT = Content("text/plain", {"type": "string"})
# The problems a route answers (besides 401 and 403 on /v1, 413 for a body too large,
# and a 500 or 503 anywhere), each with when.
JSON_BODY = {400: "the body is not JSON", 415: "the body is not application/json"}
INVALID = {422: "the body breaks its schema (`detail` says where)"}
PAGED = {400: "`after` or `limit` is not a whole number in range"}
BATCH = {400: "the body is not a batch of events (each event is judged on its own, in the 200 answer)",
         415: "the body is neither application/json nor NDJSON"}
CUSTOMER = Query("customer", {"type": "string"}, "only this customer's")
# A collection's notes beside its summaries.
_COLLECTION_NOTES = {"model_prices": " (per million tokens; a `/` in a model name is written `%2F`)",
                     "tool_prices": " (per call)"}


def _catalog_routes(section: str, kind: str) -> tuple[Route, ...]:
    # The four routes of one catalog collection, `/v1/<section>` and `/v1/<section>/{key}`.
    what = f"`{section}`{_COLLECTION_NOTES.get(section, '')}"
    entry_type, written = ENTRY_TYPES[kind], _WRITTEN[kind]
    return (
        Route("GET", f"/v1/{section}", _list_entries, f"List the catalog's {what}", {200: Page[entry_type]}),
        Route("GET", f"/v1/{section}/{{key}}", _get_entry, f"One entry of {what}",
              {200: entry_type, 404: "no such entry"}),
        Route("PUT", f"/v1/{section}/{{key}}", _put_entry,
              f"Create (201) or update (200) an entry of {what}: idempotent, `result` says which",
              {201: written, 200: written, **JSON_BODY,
               422: "the entry breaks its schema or the catalog's rules, or names what is not there (`errors`)"},
              body=entry_type),
        Route("DELETE", f"/v1/{section}/{{key}}", _delete_entry, f"Delete an entry of {what}",
              {204: None, 404: "no such entry", 409: "a live entry still names it (`referrers`)"}),
    )


ROUTES = (
    # specific paths before the catalog's
    Route("GET", "/healthz", _health, "Liveness: the store answers", {200: Health}),
    Route("GET", "/openapi.json", _openapi, "This document", {200: dict[str, object]}),
    Route("GET", "/metrics", _metrics, "Prometheus metrics", {200: TEXT}),
    Route("GET", "/v1/guards", _guards, "The guard file in force: version, guards, reloads and rejected reloads",
          {200: GuardsInForce, 404: "no guard file is configured"}),
    Route("POST", "/v1/events", _ingest_handler(USAGE), "Ingest usage events (JSON batch or NDJSON); the answer "
          "says what became of each (a rejected one does not sink the rest)", {200: IngestReport, **BATCH},
          body=list[UsageEvent] | Batch[UsageEvent], ndjson=NDJSON),
    Route("POST", "/v1/costs", _ingest_handler(COST), "Ingest cost (COGS) events (JSON batch or NDJSON); the "
          "answer says what became of each", {200: IngestReport, **BATCH}, body=list[CostEvent] | Batch[CostEvent],
          ndjson=NDJSON),
    Route("POST", "/v1/customers/{customer}/api-keys", _create_api_key, "Create an API key (the key is shown once)",
          {201: CreatedApiKey, 404: "no such customer"}),
    Route("GET", "/v1/customers/{customer}/api-keys", _list_api_keys, "List a customer's API keys",
          {200: Page[ShownApiKey]}, query=(Query("prefix", {"type": "string"}, "only keys starting so"),)),
    Route("DELETE", "/v1/api-keys/{key_id}", _revoke_api_key, "Revoke an API key",
          {204: None, 404: "no such active key"}),
    Route("GET", "/v1/customers/{customer}/margin", _customer_margin,
          "A customer's margin this billing period, per metric and overall",
          {200: CustomerMargin, 404: "no such customer, or none with a billable subscription now"}),
    Route("GET", "/v1/reports/pnl", _pnl, "Profit and loss this billing period: every customer, worst margin "
          "first, totals per currency and a grand total where one currency (or stated rates) allows",
          {200: ProfitAndLoss}),
    Route("GET", "/v1/edge/state", _edge_state, "The edge state proxies decide from, and its version",
          {200: EdgeState}),
    Route("GET", "/v1/edge/changes", _edge_changes,
          "Customers changed since version `since` (long poll up to `wait_s` seconds); `resync`: pull the state",
          {200: EdgeChanges, 400: "`wait_s` is not a number"}, query=(
              Query("since", {"type": "string", "default": ""}, "the version the proxy holds"),
              Query("wait_s", {"type": "number", "default": 0},
                    f"seconds to wait for a change when there is none yet (at most {LONG_POLL_MAX_S:g})"))),
    Route("POST", "/v1/edge/leases", _lease_quota,
          "Lease units of a customer's hard quota to a proxy worker (chunks shrink near the limit)",
          {200: Lease, 404: "the customer has no hard quota on the metric now", **INVALID}, body=LeaseRequest),
    Route("POST", "/v1/edge/leases/return", _return_quota, "Give unused leased units back", {204: None, **INVALID},
          body=LeaseReturn),
    Route("POST", "/v1/edge/throttles", _take_throttle_tokens,
          "Take tokens of a throttled customer's level-2 bucket, shared by every proxy worker",
          {200: ThrottleTokens, **INVALID}, body=ThrottleRequest),
    Route("POST", "/v1/tokens", _create_token, "Create a bearer token of a scope (`admin` or `proxy`; shown once)",
          {201: CreatedToken, **JSON_BODY, **INVALID}, body=NewToken),
    Route("GET", "/v1/tokens", _list_tokens, "List the tokens: id, name, scope, created_at, revoked_at",
          {200: Page[Token]}),
    Route("DELETE", "/v1/tokens/{token_id}", _revoke_token, "Revoke a token (refused from its next request on)",
          {204: None, 404: "no such live token"}),
    Route("GET", "/v1/actions", _actions, "The trail of guard level transitions", {200: Page[ListedAction], **PAGED},
          query=(CUSTOMER, AFTER, LIMIT)),
    Route("GET", "/v1/events/unrated", _unrated_events,
          "Events kept but not rated (unknown metric, no subscription yet), each with why",
          {200: Page[UnratedEvent], **PAGED}, query=(AFTER, LIMIT)),
    Route("POST", "/v1/events/unrated/rate", _rate_unrated, "Rate the unrated events the catalog now knows how to",
          {200: Rerated}),
    Route("GET", "/v1/events", _late_events,
          "Late events (more than 24 h behind when they arrived), for reconciliation",
          {200: Page[LateEvent], 400: "`late=true` is missing, or `since` or `limit` is out of form"},
          query=(Query("late", {"enum": ["true", "1"]}, "list the late events (the only listing of events)",
                       required=True),
                 Query("since", {"type": "number", "default": 0}, "only those ingested since (epoch seconds)"),
                 Query("limit", {"type": "integer", "minimum": 1, "default": 1000},
                       "at most this many (more than 1000 is read as 1000)"))),
    Route("GET", "/v1/audit", _audit,
          "The audit trail: who changed which catalog entry, API key or token, and the entry before and after",
          {200: Page[AuditEntry], **PAGED}, query=(
              Query("kind", {"type": "string"}, "only changes to this kind (a catalog kind, `api_key`, `token`)"),
              Query("key", {"type": "string"}, "only changes to the entry of this key or id"), AFTER, LIMIT)),
    Route("GET", "/v1/dead-letters", _dead_letters, "Events the meter stream could not take in, each with why",
          {200: Page[ListedDeadLetter], **PAGED}, query=(AFTER, LIMIT)),
    Route("GET", "/v1/webhooks", _webhooks,
          "The webhook outbox: each delivery's status, attempts and last error",
          {200: WebhookOutbox, 400: "`status` is not a status, or `after` or `limit` not a whole number in range"},
          query=(Query("status", {"enum": list(WEBHOOK_STATUSES)}, "only deliveries in this status"),
                 AFTER, LIMIT)),
    *(route for section, kind in SECTIONS for route in _catalog_routes(section, kind)),
)


def _token_problems(route: Route) -> dict[int, str]:
    # What a /v1 route answers a request whose bearer token it does not accept.
    if not route.path.startswith("/v1/"):
        return {}
    problems = {401: "no bearer token, or an unknown or revoked one"}
    if len(scopes_allowing(route.method, route.path)) < len(SCOPES):
        problems[403] = "the token's scope does not allow this route (`needed_scope`)"
    return problems


def _outgoing_webhooks() -> dict:
    # What the control plane POSTs to each notify channel (OpenAPI 3.1 `webhooks`).
    headers = [{"name": name, "in": "header", "required": True, "description": description, "schema": {
        "type": "integer" if name == TIMESTAMP_HEADER else "string"}} for name, description in (
        (ID_HEADER, "the webhook's id, the same on every attempt: drop repeats by it"),
        (TIMESTAMP_HEADER, "epoch seconds when this attempt was signed"),
        (SIGNATURE_HEADER, "`v1=` + hex HMAC-SHA256 under the channel's secret of `{id}.{timestamp}.` + the body"))]
    return {LEVEL_CHANGED: ("A customer's margin level changed under a guard", headers, LevelChanged)}


def create_app(store: Store, clock: Callable[[], float] = time.time, *, guards=None,
               metrics: ControlPlaneMetrics | None = None, webhooks=None,
               feed: EdgeFeed | None = None, reporting=None) -> web.Application:
    """The REST API over `store`; `clock` gives epoch seconds (the ingest gates' now);
    `guards` is the watched guard file (config.guards.watch_guards) or None;
    `webhooks` the WebhookSender woken when transitions enqueue webhooks, or None;
    `feed` the edge feed proxies follow (one over `store` and `guards` when None);
    `reporting` the settings' Reporting for P&L totals across currencies, or None."""
    app = web.Application(middlewares=[_problems, _scoped_tokens], client_max_size=MAX_BODY_BYTES)
    app[STORE] = store
    app[CLOCK] = clock
    app[GUARDS] = guards
    app[REPORTING] = reporting
    app[METRICS] = metrics or ControlPlaneMetrics()
    app[RATER] = CurrentRater(store)
    app[FEED] = feed or EdgeFeed(store, guards, app[RATER])
    app.on_shutdown.append(_release_long_polls)
    app[WEBHOOKS] = webhooks
    app[INTAKE] = Intake(store, app[RATER], app[FEED], guards, webhooks, clock,
                         count_unrated=app[METRICS].unrated.inc)
    app[OPENAPI] = openapi_document(ROUTES, Problem, title="Aforo Edge control plane", token_problems=_token_problems,
                                    key_from_path=tuple(ENTRY_TYPES.values()), webhooks=_outgoing_webhooks())
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    return app
