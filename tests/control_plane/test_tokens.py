# Scoped tokens over the REST API and the `aforo tokens` command, on both stores:
# proxy tokens reach only the proxy's routes, admin tokens everything, and a revoked
# token is refused on its very next request.
import datetime

import aiohttp
import pytest
from running_api import NOW, api_test, catalog_for_cus_1

from control_plane import cli
from control_plane.api import ROUTES
from control_plane.tokens import SCOPE_ROUTES


async def as_token(api, token, method, path, body=None):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        async with session.request(method, api.base + path, json=body) as response:
            return response.status, response.headers.get("Content-Type", ""), await response.json(content_type=None) \
                if await response.read() else None


async def new_token(api, name, scope):
    status, _, body = await api.call("POST", "/v1/tokens", {"name": name, "scope": scope})
    assert status == 201 and body["token"].startswith(f"aforo_{scope}_")
    return body


def test_a_proxy_token_reads_edge_state_leases_and_meters_but_manages_nothing(backend):
    async def scenario(api):
        await catalog_for_cus_1(api.store)
        await api.store.put_catalog("plan", "pro", {"tier": "pro", "quotas": {"api_calls": {"limit": 1000}}}, author="test")
        proxy = (await new_token(api, "edge-1", "proxy"))["token"]
        status, _, body = await as_token(api, proxy, "GET", "/v1/edge/state")
        assert status == 200 and "cus_1" in str(body["state"])
        status, _, body = await as_token(api, proxy, "POST", "/v1/edge/leases",
                                         {"customer_id": "cus_1", "metric": "api_calls", "needed": 1, "wanted": 10})
        assert status == 200, body
        status, _, body = await as_token(api, proxy, "POST", "/v1/events", [{
            "id": "evt_1", "customer_id": "cus_1", "metric": "api_calls", "quantity": 1,
            "timestamp": datetime.datetime.fromtimestamp(NOW - 10, datetime.timezone.utc).isoformat()}])
        assert status == 200 and body["accepted"] == 1, body
        for method, path, body in (("PUT", "/v1/plans/x", {"tier": "x"}), ("GET", "/v1/tokens", None),
                                   ("POST", "/v1/customers/cus_1/api-keys", None)):
            status, content_type, problem = await as_token(api, proxy, method, path, body)
            assert (status, content_type) == (403, "application/problem+json")
            assert problem["needed_scope"] == "admin" and problem["scope"] == "proxy"
            assert "needs a token of the `admin` scope" in problem["detail"]
        assert await api.store.get_catalog("plan", "x") is None
        assert await api.store.api_keys("cus_1") == []
    api_test(backend, scenario)


def test_tokens_are_listed_without_secrets_and_a_revoked_one_is_refused_at_once(backend):
    async def scenario(api):
        created = await new_token(api, "ops", "admin")
        assert (await as_token(api, created["token"], "GET", "/v1/tokens"))[0] == 200
        status, _, listing = await api.call("GET", "/v1/tokens")
        assert status == 200
        shown = next(item for item in listing["items"] if item["id"] == created["id"])
        assert shown == {"id": created["id"], "name": "ops", "scope": "admin", "created_at": NOW, "revoked_at": None}
        assert created["token"] not in str(listing)
        assert (await api.call("DELETE", f"/v1/tokens/{created['id']}"))[0] == 204
        status, _, problem = await as_token(api, created["token"], "GET", "/v1/tokens")
        assert status == 401 and "revoked" in problem["detail"]
        status, _, listing = await api.call("GET", "/v1/tokens")
        assert next(item for item in listing["items"] if item["id"] == created["id"])["revoked_at"] == NOW
        status, _, problem = await api.call("DELETE", "/v1/tokens/tok_unknown")
        assert status == 404 and "tok_unknown" in problem["detail"]
    api_test(backend, scenario)


@pytest.mark.parametrize("body, path", [({"scope": "proxy"}, "$.name"), ({"name": "x", "scope": "root"}, "$.scope"),
                                        ({"name": "x", "scopes": "proxy"}, "$.scopes")])
def test_a_bad_token_request_says_which_field_and_creates_nothing(backend, body, path):
    async def scenario(api):
        before = await api.call("GET", "/v1/tokens")
        status, content_type, problem = await api.call("POST", "/v1/tokens", body)
        assert (status, content_type, problem["path"]) == (422, "application/problem+json", path)
        assert path in problem["detail"]
        assert await api.call("GET", "/v1/tokens") == before
    api_test(backend, scenario)


def test_every_route_a_scope_names_is_a_route_of_the_api():
    routes = {(route.method, route.path) for route in ROUTES}
    for allowed in SCOPE_ROUTES.values():
        assert allowed is None or allowed <= routes


def test_aforo_tokens_creates_lists_and_revokes_on_the_store(backend, capsys):
    database = backend.database_url

    def aforo(*args):
        status = cli.main(["tokens", "--database", database, *args])
        out, err = capsys.readouterr()
        return status, out, err

    status, out, _ = aforo("create", "--name", "edge-2", "--scope", "proxy")
    assert status == 0
    token_id = out.split()[1]
    assert "(proxy) edge-2" in out and "token (shown once, keep it): aforo_proxy_" in out
    secret = out.rsplit(" ", 1)[1].strip()
    status, out, _ = aforo("list")
    assert status == 0 and f"{token_id}  proxy  edge-2" in out and out.rstrip().endswith("live")
    assert secret not in out
    assert aforo("revoke", token_id)[:2] == (0, f"revoked {token_id} (proxy) edge-2\n")
    assert "revoked 20" in aforo("list")[1]
    status, out, err = aforo("revoke", token_id)
    assert (status, out) == (2, "") and f"no live token `{token_id}`" in err and "Traceback" not in err
    status, _, err = aforo("create", "--name", "x", "--scope", "root")
    assert status == 2 and "invalid choice: 'root'" in err
