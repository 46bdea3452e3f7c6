# /openapi.json tells the truth, on both stores: it is a valid OpenAPI 3.1 document; it
# describes exactly the routes the app serves, each with its path parameters and a
# success answer with a schema; and every answer of a walk through the whole API,
# success or problem, validates against the schema the document gives for that
# operation and status, as does every request body the API accepts, while bodies that
# break a documented constraint are refused by both the document and the API.
import json
from urllib.parse import quote

import aiohttp
import jsonschema
import pytest
from openapi_spec_validator import validate
from running_api import NOW, api_test, example_api, token_guards

from control_plane.api import ROUTES
from control_plane.store import DeadLetter
from control_plane.tokens import PROXY, SCOPE_ROUTES

PROXY_ROUTES = SCOPE_ROUTES[PROXY]       # what every scope may call

JSON_SCHEMA_2020_12 = "https://json-schema.org/draft/2020-12/schema"


class Described:
    """The served document, checking real requests and answers against it."""

    def __init__(self, document):
        self.document = document

    def _validator(self, schema):
        # The schema with the document's components beside it, so `#/components/...` resolves.
        root = {"$schema": JSON_SCHEMA_2020_12, "components": self.document["components"], "allOf": [schema]}
        validator = jsonschema.validators.validator_for(root)
        validator.check_schema(root)
        return validator(root)

    def operation(self, method, template):
        return self.document["paths"][template][method.lower()]

    def answer_errors(self, method, template, status, content_type, body) -> list[str]:
        responses = self.operation(method, template)["responses"]
        response = responses.get(str(status), responses["default"])
        if str(status) not in responses:        # only failures of the control plane or its store
            assert status in (500, 503), f"{method} {template}: a {status} the document does not give"
        if "content" not in response:
            assert body is None, f"{method} {template} {status}: a body where the document gives none"
            return []
        media_type = content_type.split(";")[0]
        assert media_type in response["content"], f"{method} {template} {status}: answered {media_type}"
        schema = response["content"][media_type]["schema"]
        return [error.message for error in self._validator(schema).iter_errors(body)]

    def takes(self, method, template, body) -> bool:
        """Whether the document's request schema allows `body`."""
        schema = self.operation(method, template)["requestBody"]["content"]["application/json"]["schema"]
        return self._validator(schema).is_valid(body)


class Walk:
    """Calls the API and checks each answer against the document; remembers the
    operations answered with success."""

    def __init__(self, api, described):
        self.api = api
        self.described = described
        self.succeeded = set()

    async def call(self, method, template, body=None, *, query="", raw=None, content_type="application/json",
                   token=None, **params):
        path = template.format(**{name: quote(value, safe="") for name, value in params.items()})
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": content_type} if data is not None else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.api.session.request(method, self.api.base + path + query, data=data,
                                            headers=headers) as response:
            text = await response.read()
            content_type = response.headers.get("Content-Type", "")
            status = response.status
        answer = (json.loads(text) if content_type.split(";")[0].endswith("json") else text.decode()) if text \
            else None
        errors = self.described.answer_errors(method, template, status, content_type, answer)
        assert not errors, f"{method} {path} {status}: {errors} in {answer}"
        if status < 400:
            self.succeeded.add((method, template))
            # (A batch answers 200 with each event the document refuses rejected on its own.)
            if body is not None and raw is None and not (isinstance(answer, dict) and answer.get("rejected")):
                assert self.described.takes(method, template, body), f"{method} {path} took what the document refuses"
        return status, answer

    async def refused(self, method, template, body, status, **params):
        """A body breaking a documented constraint: the document's schema refuses it,
        and so does the API, with `status`; the problem's detail."""
        assert not self.described.takes(method, template, body), body
        answered, problem = await self.call(method, template, body, **params)
        assert answered == status, problem
        return problem["detail"]


async def served_document(api):
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(api.base + "/openapi.json") as response:
            assert response.status == 200
            return await response.json()


def test_the_document_is_valid_openapi_3_1_and_describes_exactly_the_routes_served(backend):
    async def scenario(api):
        document = await served_document(api)
        validate(document)
        assert document["openapi"] == "3.1.0"
        served = {(route.method.lower(), route.resource.canonical) for route in api.runner.app.router.routes()}
        described = {(method, path) for path, operations in document["paths"].items() for method in operations}
        assert described == served
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                named = [parameter["name"] for parameter in operation.get("parameters", ())
                         if parameter["in"] == "path" and parameter["required"]]
                assert sorted(named) == sorted(part[1:-1] for part in path.split("/") if part.startswith("{")), path
                successes = {status: response for status, response in operation["responses"].items()
                             if status.startswith("2")}
                assert successes, f"{method} {path} has no success answer"
                for status, response in successes.items():
                    assert status == "204" or response["content"], f"{method} {path} {status} has no schema"
                assert operation.get("security") == ([{"bearer": []}] if path.startswith("/v1/") else None), path
                problems = {status: response for status, response in operation["responses"].items()
                            if not status.startswith("2")}
                assert "default" in problems and ("401" in problems) == path.startswith("/v1/"), path
                assert ("403" in problems) == (path.startswith("/v1/") and (method.upper(), path) not in PROXY_ROUTES)
                for response in problems.values():
                    assert response["content"] == {"application/problem+json": {
                        "schema": {"$ref": "#/components/schemas/Problem"}}}
        schemas = document["components"]["schemas"]
        # The constraints of the types the handlers decode, as the document states them.
        assert schemas["UsageEvent"]["properties"]["quantity"]["minimum"] == 0
        assert schemas["ThrottleRequest"]["properties"]["tokens"]["minimum"] == 1
        assert schemas["Problem"]["required"] == ["type", "title", "status", "detail"]
        assert {"by_currency", "currency", "exchange_rates", "missing_rates"} <= set(
            schemas["ProfitAndLoss"]["properties"])
        assert {"allocated_nanos", "currency"} <= set(schemas["CustomerMargin"]["properties"])
        pnl = document["paths"]["/v1/reports/pnl"]["get"]["responses"]["200"]["content"]["application/json"]
        assert pnl["schema"] == {"$ref": "#/components/schemas/ProfitAndLoss"}
    api_test(backend, scenario)


ENTRIES = {        # section: (key, a body PUT creates it with)
    "metrics": ("walk_calls", {"aggregation": "count", "unit_cost": "0.0001"}),
    "model_prices": ("org/walk-model", {"input": "2.50", "output": 10}),
    "tool_prices": ("walk_tool", {"per_call": "0.01"}),
    "features": ("walk_feature", {"description": "for the walk"}),
    "plans": ("walk", {"tier": "walk", "fixed_fee": "10", "fee_allocation": {"walk_calls": "100%"},
                       "features": ["walk_feature"], "quotas": {"walk_calls": {"limit": 10}},
                       "charges": [{"metric": "walk_calls", "model": "graduated", "tiers": [
                           {"up_to": 5, "price": "0"}, {"up_to": None, "price": "0.01"}]}]}),
    "customers": ("cus_walk", {"name": "Walk", "email": "walk@example.com"}),
    "subscriptions": ("sub_walk", {"customer": "cus_walk", "plan": "walk", "period_anchor": "2026-12-01T00:00:00Z"}),
}


def usage(event_id, customer="cus_globex", metric="ai_tokens", **fields):
    return {"id": event_id, "customer_id": customer, "metric": metric, "quantity": 1000,
            "timestamp": "2027-01-15T07:00:00Z", **fields}


def cost(event_id, amount, **fields):
    return {"id": event_id, "customer_id": "cus_globex", "amount": amount, "metric": "ai_tokens",
            "timestamp": "2027-01-15T07:00:00Z", **fields}


def test_every_answer_of_a_walk_through_the_api_is_what_the_document_says(backend, tmp_path):
    async def scenario(open_store):
        store = await open_store()
        async with await example_api(store, token_guards(tmp_path)) as api:
            walk = Walk(api, Described(await served_document(api)))
            for template in ("/healthz", "/openapi.json", "/metrics", "/v1/guards"):
                assert (await walk.call("GET", template))[0] == 200

            # The catalog, section by section: created, unchanged, read, listed.
            for section, (key, body) in ENTRIES.items():
                one = f"/v1/{section}/{{key}}"
                assert (await walk.call("PUT", one, body, key=key))[0] == 201
                status, written = await walk.call("PUT", one, {**body, "key": key}, key=key)
                assert (status, written["result"]) == (200, "unchanged")
                assert (await walk.call("GET", one, key=key))[1]["key"] == key
                assert key in [item["key"] for item in (await walk.call("GET", f"/v1/{section}"))[1]["items"]]
            assert "Expected an amount >= 0" in await walk.refused(
                "PUT", "/v1/plans/{key}", {"tier": "walk", "fixed_fee": "-1"}, 422, key="bad")
            assert (await walk.call("PUT", "/v1/plans/{key}", {"tier": "walk", "features": ["nope"]},
                                    key="bad"))[1]["errors"][0]["path"] == "$.features"
            assert await walk.refused("PUT", "/v1/tool_prices/{key}", {"per_call": "1", "typo": 1}, 422,
                                      key="bad")
            status, named = await walk.call("DELETE", "/v1/metrics/{key}", key="walk_calls")
            assert (status, named["referrers"][0]["kind"]) == (409, "plan")
            assert (await walk.call("GET", "/v1/features/{key}", key="nope"))[0] == 404

            # API keys and tokens.
            status, created = await walk.call("POST", "/v1/customers/{customer}/api-keys", customer="cus_walk")
            assert status == 201 and created["key"].startswith(created["prefix"])
            listed = await walk.call("GET", "/v1/customers/{customer}/api-keys", query="?prefix=ak_",
                                     customer="cus_walk")
            assert [item["id"] for item in listed[1]["items"]] == [created["id"]]
            assert (await walk.call("DELETE", "/v1/api-keys/{key_id}", key_id=created["id"]))[0] == 204
            assert (await walk.call("DELETE", "/v1/api-keys/{key_id}", key_id=created["id"]))[0] == 404
            status, token = await walk.call("POST", "/v1/tokens", {"name": "edge-1", "scope": "proxy"})
            assert status == 201 and token["scope"] == "proxy"
            assert token["id"] in [item["id"] for item in (await walk.call("GET", "/v1/tokens"))[1]["items"]]
            status, problem = await walk.call("GET", "/v1/tokens", token=token["token"])
            assert (status, problem["needed_scope"]) == (403, "admin")
            assert (await walk.call("GET", "/v1/edge/state", token=token["token"]))[0] == 200
            for bad in ({"name": " "}, {"name": "x", "scope": "root"}, {"name": "x", "typo": 1}, {"scope": "admin"}):
                await walk.refused("POST", "/v1/tokens", bad, 422)
            assert (await walk.call("DELETE", "/v1/tokens/{token_id}", token_id=token["id"]))[0] == 204

            # Ingest: a batch with a rejected event (quantity -1) answers per event.
            quantity = await walk.call("POST", "/v1/events", [usage("u1"), usage("u2", quantity=-1),
                                                             usage("u3", metric="not_in_catalog")])
            assert [result["status"] for result in quantity[1]["results"]] == ["accepted", "rejected", "unrated"]
            assert not walk.described.takes("POST", "/v1/events", [usage("u2", quantity=-1)])
            assert quantity[1]["unrated"] == 1
            assert (await walk.call("POST", "/v1/events", {"events": [usage("u4", timestamp="2027-01-13T00:00:00Z")]
                                                           }))[1]["accepted_late"] == 1
            ndjson = b"\n".join(json.dumps(usage(f"n{n}")).encode() for n in range(2)) + b"\nnot json\n"
            status, report = await walk.call("POST", "/v1/events", raw=ndjson, content_type="application/x-ndjson")
            assert (status, report["accepted"], report["rejected"]) == (200, 2, 1)
            assert (await walk.call("POST", "/v1/events", raw=b"{oops"))[0] == 400
            status, report = await walk.call("POST", "/v1/costs", [cost("c1", "35.00"), cost("c2", "-1"),
                                                                   cost("c3", "1.00", currency="EUR")])
            assert [result["status"] for result in report["results"]] == ["accepted", "rejected", "unrated"]
            assert report["unrated"] == 1
            for amount in ("-1", "1e400"):
                assert not walk.described.takes("POST", "/v1/costs", [cost("c4", amount)])
                assert (await walk.call("POST", "/v1/costs", [cost("c4", amount)]))[1]["rejected"] == 1

            # What the events came to.
            unrated = (await walk.call("GET", "/v1/events/unrated"))[1]["items"]
            assert {item["event_id"] for item in unrated} == {"u3", "c3"}
            assert (await walk.call("POST", "/v1/events/unrated/rate"))[1] == {"rated": 0, "still_unrated": 2}
            late = (await walk.call("GET", "/v1/events", query="?late=true"))[1]["items"]
            assert [item["event_id"] for item in late] == ["u4"]
            assert (await walk.call("GET", "/v1/events"))[0] == 400
            margin = (await walk.call("GET", "/v1/customers/{customer}/margin", customer="cus_globex"))[1]
            assert (margin["currency"], margin["plan"]) == ("USD", "pro")
            assert (await walk.call("GET", "/v1/customers/{customer}/margin", customer="nobody"))[0] == 404
            pnl = (await walk.call("GET", "/v1/reports/pnl"))[1]
            assert pnl["currency"] == "USD" and pnl["missing_rates"] == []
            actions = (await walk.call("GET", "/v1/actions", query="?customer=cus_globex"))[1]["items"]
            assert [(item["level_from"], item["level_to"]) for item in actions] == [(0, 2)]
            audit = (await walk.call("GET", "/v1/audit", query="?kind=plan&limit=5"))[1]["items"]
            assert [entry["key"] for entry in audit][-1] == "walk"
            for query in ("?limit=0", "?after=-1", "?limit=x"):
                assert (await walk.call("GET", "/v1/audit", query=query))[0] == 400
            await store.add_dead_letters([DeadLetter("meter-stream", "1-0", b'{"id": "x"}', "too many units", NOW)])
            assert (await walk.call("GET", "/v1/dead-letters"))[1]["items"][0]["event"] == '{"id": "x"}'
            outbox = (await walk.call("GET", "/v1/webhooks", query="?status=pending"))[1]
            assert outbox["counts"]["pending"] == len(outbox["items"]) >= 1
            assert outbox["items"][0]["payload"]["type"] == "margin.level_changed"
            assert (await walk.call("GET", "/v1/webhooks", query="?status=lost"))[0] == 400

            # What the proxies call.
            state = (await walk.call("GET", "/v1/edge/state"))[1]
            assert "cus_globex" in [customer["id"] for customer in state["state"]["customers"]]
            changes = (await walk.call("GET", "/v1/edge/changes", query=f"?since={state['version']}&wait_s=0"))[1]
            assert changes["version"] == state["version"]
            assert (await walk.call("GET", "/v1/edge/changes", query="?since=old"))[1]["resync"] is True
            lease = {"customer_id": "cus_wonka", "metric": "api_calls", "needed": 1, "wanted": 10}
            status, granted = await walk.call("POST", "/v1/edge/leases", lease)
            assert status == 200 and granted["granted"] >= 1
            assert (await walk.call("POST", "/v1/edge/leases", {**lease, "metric": "ai_tokens",
                                                               "customer_id": "cus_globex"}))[0] == 404
            for bad in ({"needed": "1"}, {"needed": -1}, {"debt": -5}):
                await walk.refused("POST", "/v1/edge/leases", {**lease, **bad}, 422)
            returned = {"customer_id": "cus_wonka", "metric": "api_calls", "period_start": granted["period_start"],
                        "units": granted["granted"]}
            await walk.refused("POST", "/v1/edge/leases/return", {**returned, "units": -1}, 422)
            assert (await walk.call("POST", "/v1/edge/leases/return", returned))[0] == 204
            throttle = {"customer_id": "cus_globex", "guard_id": "tokens-floor", "metric": "ai_tokens", "tokens": 5,
                        "per_s": 1, "burst": 5}
            assert (await walk.call("POST", "/v1/edge/throttles", throttle))[1]["granted"] == 1
            for bad in ({"tokens": 0}, {"per_s": 0}, {"wanted": 1001}):
                await walk.refused("POST", "/v1/edge/throttles", {**throttle, **bad}, 422)

            # The catalog taken down again, the last entries first.
            for section, (key, _) in reversed(ENTRIES.items()):
                assert (await walk.call("DELETE", f"/v1/{section}/{{key}}", key=key))[0] == 204

            assert (await walk.call("GET", "/v1/plans", token="revoked-or-never-made"))[0] == 401
            assert walk.succeeded == {(route.method, route.path) for route in ROUTES}
    backend.run(scenario)


@pytest.fixture(autouse=True)
def _quiet_aiohttp_access_log(caplog):
    caplog.set_level("WARNING", logger="aiohttp.access")
