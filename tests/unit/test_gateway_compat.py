"""The gateway's metadata reads against both kinds of Rucio server (in memory): one that honours plugin= in
get_metadata_bulk (41.5.1 and later) and one that ignores it and answers the DID columns only (38 LTS,
rucio/rucio#7323). The project's marks and the datasets' states come out the same on both."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from rucio.common import exception as rx

from injector import marks
from injector.config import RucioSettings
from injector.errors import PermissionDenied
from injector.gateway import ClientGateway, DatasetState

DS = ("lst", "LST1_20261124_raw")
F1 = ("lst", "/data/lst1/r1.fits")
F2 = ("lst", "/data/lst1/r2.fits")
MISSING = ("lst", "/data/lst1/gone.fits")


class Server:
    """rucio-clients' metadata calls as a Rucio server answers them. `honours`: get_metadata_bulk answers the plugin
    asked for (41); otherwise it answers the DID table's row whatever the plugin (38). get_metadata honours plugin=
    on both, and inherit=True (never wanted) merges the parents' JSON metadata into the child's."""

    def __init__(self, honours: bool) -> None:
        self.honours = honours
        self.calls: Counter[str] = Counter()
        self.columns: dict[tuple[str, str], dict[str, Any]] = {}
        self.json: dict[tuple[str, str], dict[str, Any]] = {}
        self.parents: dict[tuple[str, str], tuple[str, str]] = {}
        self.denied: set[tuple[str, str]] = set()
        self.add(DS, "DATASET", {marks.FINISHED: 2, marks.UNATTACHED: ["/data/lst1/r3.fits"], "season": "winter"},
                 is_open=False)
        self.add(F1, "FILE", {marks.PATH: F1[1], marks.DATASET: DS[1], "quality": "good"}, parent=DS)
        self.add(F2, "FILE", {}, parent=DS)

    def add(self, did: tuple[str, str], did_type: str, json: dict[str, Any], is_open: bool = True,
            parent: tuple[str, str] | None = None) -> None:
        self.columns[did] = {"scope": did[0], "name": did[1], "account": "root", "did_type": did_type,
                             "is_open": is_open if did_type == "DATASET" else None, "bytes": 1, "adler32": None,
                             "created_at": "2026-11-24T10:00:00", "updated_at": "2026-11-24T11:00:00"}
        self.json[did] = dict(json)
        if parent:
            self.parents[did] = parent

    def whoami(self) -> dict[str, str]:
        return {"account": "root"}

    def _plugin(self, did: tuple[str, str], plugin: str) -> dict[str, Any]:
        if plugin == "DID_COLUMN":
            return dict(self.columns[did])
        if plugin == "JSON":
            return dict(self.json[did])
        return {**self.columns[did], **self.json[did]}

    def get_metadata(self, scope: str, name: str, plugin: str = "DID_COLUMN") -> dict[str, Any]:
        self.calls["get_metadata"] += 1
        did = (scope, name)
        if did in self.denied:
            raise rx.AccessDenied(f"{scope}:{name}")
        if did not in self.columns:
            raise rx.DataIdentifierNotFound(f"Data identifier '{scope}:{name}' not found")
        return self._plugin(did, plugin)

    def get_metadata_bulk(self, dids: list[dict[str, Any]], inherit: bool = False,
                          plugin: str = "DID_COLUMN") -> Any:
        self.calls["get_metadata_bulk"] += 1
        found = [did for d in dids if (did := (d["scope"], d["name"])) in self.columns]
        if not found:
            raise rx.DataIdentifierNotFound("No Data Identifiers found")
        rows = []
        for did in found:
            if inherit:
                row = {"scope": did[0], "name": did[1], **self._plugin(did, plugin)}
                parent = self.parents.get(did)
                while parent:
                    row = {**self._plugin(parent, plugin), **row}
                    parent = self.parents.get(parent)
            elif self.honours and plugin != "DID_COLUMN":
                row = {"scope": did[0], "name": did[1], **self._plugin(did, plugin)}
            else:  # 38: the DID table's row, whatever the plugin
                row = dict(self.columns[did])
            rows.append(row)
        return iter(rows)


def gateway(server: Server, observed: Counter[str] | None = None) -> ClientGateway:
    observe = (lambda op, seconds, outcome: observed.update([op])) if observed is not None else None
    return ClientGateway(RucioSettings(), client=server, observe=observe)


EXPECTED_MARKS = {
    DS: {marks.FINISHED: 2, marks.UNATTACHED: ["/data/lst1/r3.fits"]},
    F1: {marks.PATH: F1[1], marks.DATASET: DS[1]},
    F2: {},
}
EXPECTED_STATE = DatasetState(DS[0], DS[1], False, datetime(2026, 11, 24, 10, tzinfo=UTC), 2, ("/data/lst1/r3.fits",))


@pytest.mark.parametrize("honours", [True, False], ids=["rucio41", "rucio38"])
@pytest.mark.parametrize("first", ["marks", "dataset_states"])
def test_marks_and_dataset_states_are_the_same_on_both_servers_whichever_is_read_first(honours, first):
    server = Server(honours)
    gw = gateway(server)
    for _ in range(2):  # the first call detects the server's behaviour, the second uses what it learned
        if first == "dataset_states":
            assert gw.dataset_states([DS, MISSING]) == {DS: EXPECTED_STATE}
        assert gw.marks([DS, F1, F2, MISSING]) == EXPECTED_MARKS
        assert gw.dataset_states([DS, MISSING]) == {DS: EXPECTED_STATE}
    assert gw.bulk_plugin is honours


def test_a_dataset_without_marks_is_read_the_same_on_both_servers():
    for honours in (True, False):
        server = Server(honours)
        server.json[DS] = {"season": "winter"}
        gw = gateway(server)
        for _ in range(2):
            assert gw.dataset_states([DS]) == {DS: DatasetState(DS[0], DS[1], False, EXPECTED_STATE.created_at,
                                                                None, ())}
        assert gw.bulk_plugin is honours


def test_a_server_that_honours_the_plugin_gets_one_bulk_call_per_read_and_no_per_did_read(caplog):
    caplog.set_level(logging.WARNING, "injector.gateway")
    server = Server(honours=True)
    gw = gateway(server)
    for n in range(1, 4):
        assert gw.marks([DS, F1, F2, MISSING]) == EXPECTED_MARKS
        assert server.calls == {"get_metadata_bulk": n}
    server.calls.clear()
    for n in range(1, 4):
        assert gw.dataset_states([DS]) == {DS: EXPECTED_STATE}
        assert server.calls == {"get_metadata_bulk": n}
    assert caplog.records == []


def test_dataset_states_on_a_fresh_gateway_costs_one_bulk_call_when_the_answer_carries_marks():
    server = Server(honours=True)
    gw = gateway(server)
    assert gw.dataset_states([DS]) == {DS: EXPECTED_STATE}
    assert server.calls == {"get_metadata_bulk": 1} and gw.bulk_plugin is True


def test_dataset_states_on_a_fresh_gateway_detects_once_when_no_dataset_carries_marks():
    server = Server(honours=True)
    server.json[DS] = {}
    gw = gateway(server)
    gw.dataset_states([DS])
    assert server.calls == {"get_metadata_bulk": 2}, "the plugin=ALL read, then one plugin=JSON read to tell"
    server.calls.clear()
    gw.dataset_states([DS])
    gw.marks([F1])
    assert server.calls == {"get_metadata_bulk": 2}, "then one bulk call per read"


def test_nothing_is_learned_from_a_batch_of_missing_dids():
    server = Server(honours=False)
    gw = gateway(server)
    assert gw.marks([MISSING]) == {} and gw.dataset_states([MISSING]) == {} and gw.marks([]) == {}
    assert gw.bulk_plugin is None
    assert gw.marks([F1, MISSING]) == {F1: EXPECTED_MARKS[F1]} and gw.bulk_plugin is False


def test_a_server_that_ignores_the_plugin_is_warned_about_once_and_read_did_by_did(caplog):
    caplog.set_level(logging.INFO, "injector.gateway")
    server = Server(honours=False)
    observed: Counter[str] = Counter()
    gw = gateway(server, observed)
    total: Counter[str] = Counter()

    def took() -> Counter[str]:
        calls = Counter(server.calls)
        total.update(calls)
        server.calls.clear()
        return calls

    assert gw.marks([F1, MISSING, F2]) == {F1: EXPECTED_MARKS[F1], F2: {}}
    assert took() == {"get_metadata_bulk": 1, "get_metadata": 2}, "the bulk answer named the DIDs that exist"
    assert gw.marks([F1, MISSING, F2, F1]) == {F1: EXPECTED_MARKS[F1], F2: {}}, "a missing DID is skipped"
    assert took() == {"get_metadata": 3}, "no bulk call once the behaviour is known; each DID read once"
    assert gw.dataset_states([DS, MISSING]) == {DS: EXPECTED_STATE}
    assert took() == {"get_metadata_bulk": 1, "get_metadata": 1}, "the DID columns in bulk, the JSON by DID"
    assert gw.marks([DS]) == {DS: EXPECTED_MARKS[DS]}
    assert took() == {"get_metadata": 1}
    assert observed == total, "every read goes through the gateway's wrapper (metrics, retries, breaker)"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "rucio/rucio#7323" in warnings[0] and "one DID at a time" in warnings[0]
    assert "ignores plugin=" in warnings[0]


@pytest.mark.parametrize("honours", [True, False], ids=["rucio41", "rucio38"])
def test_a_files_marks_never_hold_its_datasets_keys(honours):
    server = Server(honours)
    gw = gateway(server)
    for _ in range(2):
        got = gw.marks([F1, F2])
        assert got == {F1: EXPECTED_MARKS[F1], F2: {}}
        assert not {marks.FINISHED, marks.UNATTACHED} & {k for m in got.values() for k in m}


def test_a_file_deleted_between_the_bulk_and_the_per_did_read_is_skipped():
    server = Server(honours=False)
    gw = gateway(server)
    gw.marks([F2])  # learns the behaviour
    original = server.get_metadata_bulk

    def bulk_then_delete(*args: Any, **kwargs: Any) -> Any:
        rows = list(original(*args, **kwargs))
        del server.columns[DS]
        return iter(rows)

    server.get_metadata_bulk = bulk_then_delete  # type: ignore[method-assign]
    assert gw.dataset_states([DS]) == {}


def test_a_refused_per_did_read_is_an_error_not_a_missing_did():
    server = Server(honours=False)
    server.denied.add(F1)
    gw = gateway(server)
    with pytest.raises(PermissionDenied):
        gw.marks([F1, F2])


def test_the_rucio_clients_own_log_lines_come_once_through_our_handler_without_colour_codes(capsys, root_logging):
    import logging

    import rucio.client.baseclient  # noqa: F401 - gives its logger a coloured stderr handler of its own

    from injector import logs

    logs.setup("INFO")
    ClientGateway(RucioSettings(), factory=lambda: object())._new_client()
    client_log = logging.getLogger("baseclient")
    assert client_log.handlers == [] and client_log.propagate
    client_log.critical("cannot reach the Rucio server")
    err = capsys.readouterr().err
    assert err.count("cannot reach the Rucio server") == 1 and "\033[" not in err, err
    assert " CRITICAL baseclient: cannot reach the Rucio server" in err
