# The audit trail, on both stores: every change to the catalog, an API key or a token,
# over REST or by a command, is recorded with who made it and the entry before and
# after; nothing is recorded for a change that did not happen.
import getpass

import pytest
from running_api import api_test, catalog_for_cus_1

from control_plane import cli

PLAN = {"tier": "pro", "quotas": {"api_calls": {"limit": 1000}}}
CHANGED_PLAN = {"tier": "pro", "quotas": {"api_calls": {"limit": 2000}}}


async def audit(api, query=""):
    status, _, body = await api.call("GET", "/v1/audit" + query)
    assert status == 200, body
    return body["items"]


async def author_of_the_tests_token(api):
    _, _, listing = await api.call("GET", "/v1/tokens")
    token = next(item for item in listing["items"] if item["name"] == "tests")
    return f"token {token['id']} (tests)"


def test_catalog_changes_over_rest_are_recorded_with_who_before_and_after(backend):
    async def scenario(api):
        await api.store.put_catalog("metric", "api_calls", {"aggregation": "count"}, author="setup")
        who = await author_of_the_tests_token(api)
        assert (await api.call("PUT", "/v1/plans/pro", PLAN))[0] == 201
        assert (await api.call("PUT", "/v1/plans/pro", PLAN))[0] == 200                # unchanged
        assert (await api.call("PUT", "/v1/plans/pro", {"tier": "pro", "quotas": {"nope": {"limit": 1}}}))[0] == 422
        assert (await api.call("PUT", "/v1/plans/pro", CHANGED_PLAN))[0] == 200
        assert (await api.call("PUT", "/v1/customers/cus_1", {}))[0] == 201
        assert (await api.call("PUT", "/v1/subscriptions/sub_1", {
            "customer": "cus_1", "plan": "pro", "period_anchor": "2026-11-01T00:00:00Z"}))[0] == 201
        assert (await api.call("DELETE", "/v1/plans/pro"))[0] == 409                 # still named
        assert (await api.call("DELETE", "/v1/subscriptions/sub_1"))[0] == 204
        assert (await api.call("DELETE", "/v1/plans/pro"))[0] == 204

        trail = await audit(api, "?kind=plan&key=pro")
        assert [(entry["change"], entry["who"]) for entry in trail] == [
            ("created", who), ("updated", who), ("deleted", who)]
        created, updated, deleted = trail
        assert created["before"] is None and created["after"]["quotas"]["api_calls"]["limit"] == 1000
        assert updated["before"] == created["after"] and updated["after"]["quotas"]["api_calls"]["limit"] == 2000
        assert deleted["before"] == updated["after"] and deleted["after"] is None
        assert all(entry["at"] > 0 for entry in trail)
        # Everything, in order (after the tests' own token), paged by seq.
        token, *everything = await audit(api)
        assert (token["kind"], token["change"], token["who"]) == ("token", "created", "test")
        assert [(entry["kind"], entry["key"], entry["change"]) for entry in everything] == [
            ("metric", "api_calls", "created"), ("plan", "pro", "created"), ("plan", "pro", "updated"),
            ("customer", "cus_1", "created"), ("subscription", "sub_1", "created"),
            ("subscription", "sub_1", "deleted"), ("plan", "pro", "deleted")]
        assert everything[0]["who"] == "setup"
        page = await audit(api, f"?after={everything[1]['seq']}&limit=2")
        assert [entry["seq"] for entry in page] == [entry["seq"] for entry in everything[2:4]]
        status, _, problem = await api.call("GET", "/v1/audit?after=first")
        assert status == 400 and "whole numbers" in problem["detail"]
    api_test(backend, scenario)


def test_api_key_and_token_changes_are_recorded_without_their_secrets(backend):
    async def scenario(api):
        await catalog_for_cus_1(api.store)
        who = await author_of_the_tests_token(api)
        _, _, key = await api.call("POST", "/v1/customers/cus_1/api-keys")
        assert (await api.call("DELETE", f"/v1/api-keys/{key['id']}"))[0] == 204
        assert (await api.call("DELETE", f"/v1/api-keys/{key['id']}"))[0] == 404      # revoked already
        _, _, token = await api.call("POST", "/v1/tokens", {"name": "edge-1", "scope": "proxy"})
        assert (await api.call("DELETE", f"/v1/tokens/{token['id']}"))[0] == 204

        keys = await audit(api, "?kind=api_key")
        assert [(entry["key"], entry["change"], entry["who"]) for entry in keys] == [
            (key["id"], "created", who), (key["id"], "revoked", who)]
        assert keys[1]["before"]["revoked_at"] is None and keys[1]["after"]["revoked_at"] is not None
        assert keys[1]["after"]["customer_id"] == "cus_1" and keys[1]["after"]["prefix"] == key["prefix"]
        tokens = await audit(api, f"?kind=token&key={token['id']}")
        assert [(entry["change"], entry["who"]) for entry in tokens] == [("created", who), ("revoked", who)]
        assert tokens[0]["after"]["name"] == "edge-1" and tokens[0]["after"]["scope"] == "proxy"
        shown = str(await audit(api))
        assert key["key"] not in shown and token["token"] not in shown and "hash" not in shown
        # The trail is for admins: a proxy token may not read it.
        _, _, proxy = await api.call("POST", "/v1/tokens", {"name": "edge-2", "scope": "proxy"})
        status, _, problem = await api.call("GET", "/v1/audit", headers={"Authorization": f"Bearer {proxy['token']}"})
        assert status == 403 and problem["needed_scope"] == "admin"
    api_test(backend, scenario)


def test_a_change_without_an_author_is_refused_and_leaves_nothing(backend):
    async def scenario(api):
        with pytest.raises(ValueError, match="needs an author"):
            await api.store.put_catalog("customer", "cus_9", {}, author="")
        assert await api.store.get_catalog("customer", "cus_9") is None
        assert await api.store.audit(kind="customer") == []
    api_test(backend, scenario)


def test_commands_are_recorded_as_the_command_and_the_user_who_ran_it(backend, tmp_path, capsys):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("metrics:\n  - {key: api_calls, aggregation: count}\ncustomers:\n  - {key: cus_1}\n")
    assert cli.main(["apply", "-f", str(catalog), "--database", backend.database_url]) == 0
    assert cli.main(["tokens", "--database", backend.database_url, "create", "--name", "ops"]) == 0
    token_id = capsys.readouterr().out.splitlines()[-2].split()[1]

    async def scenario(open_store):
        store = await open_store()
        trail = await store.audit()
        user = getpass.getuser()
        assert [(entry.kind, entry.key, entry.change, entry.who) for entry in trail] == [
            ("metric", "api_calls", "created", f"aforo apply {catalog} ({user})"),
            ("customer", "cus_1", "created", f"aforo apply {catalog} ({user})"),
            ("token", token_id, "created", f"aforo tokens create ({user})")]
    backend.run(scenario)
