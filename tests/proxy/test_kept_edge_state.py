# The edge state a worker keeps on disk: the whole state with the changes after it, as
# a later start reads them back; a change torn by a crash mid-write is left out.
from config.edge_state_file import Customer, parse_edge_state_file
from conftest import edge_state_yaml
from proxy.followed_edge_state import WireChanges, WireState
from proxy.kept_edge_state import EdgeStateKeeper


def test_the_kept_state_reads_back_with_its_changes_and_without_a_torn_one(tmp_path):
    state = parse_edge_state_file(edge_state_yaml())
    keeper = EdgeStateKeeper(tmp_path / "edge-state", wall_clock=lambda: 1_000.0)
    keeper.keep_whole(WireState("v1", state))
    added = Customer(id="cus_new", plan=state.customers[0].plan, status="active")
    keeper.keep_changes(WireChanges("v2", customers=[added]))
    keeper.keep_changes(WireChanges("v3", removed=[state.customers[0].id]))
    keeper.close()
    with open(tmp_path / "edge-state" / "changes", "ab") as changes:
        changes.write(b'{"version":"v4","remo')          # a crash mid-write

    wire, changes, kept_at = EdgeStateKeeper(tmp_path / "edge-state").load()
    assert (wire.version, wire.state, kept_at) == ("v1", state, 1_000.0)
    assert [change.version for change in changes] == ["v2", "v3"]
    assert changes[0].customers == [added] and changes[1].removed == [state.customers[0].id]


def test_a_new_whole_state_drops_the_changes_kept_before_it(tmp_path):
    state = parse_edge_state_file(edge_state_yaml())
    keeper = EdgeStateKeeper(tmp_path / "edge-state")
    keeper.keep_whole(WireState("v1", state))
    keeper.keep_changes(WireChanges("v2", removed=[state.customers[0].id]))
    keeper.keep_whole(WireState("v9", state))
    keeper.close()
    wire, changes, _ = EdgeStateKeeper(tmp_path / "edge-state").load()
    assert (wire.version, changes) == ("v9", [])


def test_nothing_kept_or_an_unreadable_state_loads_as_nothing(tmp_path):
    assert EdgeStateKeeper(tmp_path / "edge-state").load() is None
    (tmp_path / "edge-state").mkdir()
    (tmp_path / "edge-state" / "state").write_bytes(b"not json")
    assert EdgeStateKeeper(tmp_path / "edge-state").load() is None
