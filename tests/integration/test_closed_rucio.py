"""Closed datasets on the real Rucio server + RabbitMQ: a dataset ops closed while events keep coming leaves
no orphan; rolled-on datasets are found; orphans left earlier are named, and attached with --fix."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from consumers.services import ingest_worker
from injector import deadletter, marks, topology
from injector.config import Settings
from injector.events import FileClosed
from injector.gateway import ClientGateway
from operations import status
from producers.publish import DaqPublisher, file_closed
from tests.integration.conftest import ARCHIVE, SOURCE, Lab
from tests.integration.rabbit import declared, get_all, ingested, running, wait_for
from tests.integration.test_reconcile_rucio import cli, config_file, json_marks, settings_for, sweep

pytestmark = pytest.mark.integration

NIGHT = "20261124"


def night_files(lab: Lab, first: int, n: int) -> list[FileClosed]:
    out = []
    for i in range(first, first + n):
        path = lab.write(f"{NIGHT}/LST-1.1.Run{i:05d}.fits.fz", os.urandom(64) + str(i).encode())
        out.append(file_closed(path, site="ORM", instrument="LST1", night=NIGHT, run=i))
    return out


def dataset(lab: Lab) -> str:
    return f"LST1_{lab.tag}_{NIGHT}_raw"


def registered(lab: Lab) -> list[str]:
    """Every file DID under the test's buffer directory, straight from Rucio."""
    return sorted(lab.client.list_dids("lst", {"name": f"{lab.root}/*"}, did_type="file"))


def dead_letters(s: Settings) -> list[dict[str, Any]]:
    return [m.properties["application_headers"] for m in get_all(s, topology.dead_letter_queue(s.ingest.queue))]


def consume(s: Settings, events: Sequence[FileClosed], rucio: ClientGateway | None = None) -> dict[str, int]:
    with DaqPublisher(s.broker) as daq:
        daq.publish(list(events))
    worker = ingest_worker(s, rucio)
    with running(worker):
        wait_for(lambda: worker.stats.messages == len(events), timeout=60, what="ingest")
    return worker.stats.outcomes


def test_events_for_a_closed_dataset_are_dead_lettered_dataset_closed_and_register_nothing(lab):
    s = settings_for(lab)
    first = night_files(lab, 0, 1)
    later = night_files(lab, 1, 3)
    again = FileClosed.create(**first[0].model_dump(exclude={"event_id", "schema_"}))  # a DAQ resend
    with declared(s):
        ingested(s, first)
        lab.client.set_status("lst", dataset(lab), open=False)  # ops close the night
        outcomes = consume(s, [*later, again])
        dead = dead_letters(s)
    assert outcomes == {"dataset-closed": 3, "already-registered": 1}
    assert sorted(h[deadletter.REASON] for h in dead) == ["dataset-closed"] * 3
    assert all(f"lst:{dataset(lab)} is closed" in h[deadletter.ERROR] for h in dead)
    assert sorted(h[deadletter.ERROR].split(":", 2)[1] for h in dead) == sorted(e.path for e in later)
    assert registered(lab) == [first[0].path], "no orphan: nothing was registered for the closed dataset"
    assert lab.content(dataset(lab)) == [first[0].path]


def test_with_next_a_closed_night_rolls_on_to_dot_2_with_the_rules_and_reconcile_and_status_find_it(lab):
    s = settings_for(lab, on_closed_dataset="next")
    first, later = night_files(lab, 0, 1), night_files(lab, 1, 2)
    rolled = f"{dataset(lab)}.2"
    with declared(s):
        ingested(s, first)
        lab.client.set_status("lst", dataset(lab), open=False)
        assert consume(s, later) == {"registered": 2}
        assert not dead_letters(s)
    assert lab.content(rolled) == sorted(e.path for e in later)
    assert [(r["rse_expression"], r["copies"]) for r in lab.rules(rolled)] == [(ARCHIVE, 1)]
    assert not any(marks.DATASET in m for m in json_marks(lab, [e.path for e in later]).values()), \
        "nothing recorded on the files: the dataset that holds them says where they are"
    counts = status.collect(s, ClientGateway(s.rucio))["streams"]["lst1-raw"]
    assert counts[f"lst:{rolled}"]["registered"] == 2 and counts[f"lst:{dataset(lab)}"]["registered"] == 1
    (extra,) = lab.client.add_replication_rule([{"scope": "lst", "name": rolled}], 1, f"{ARCHIVE}|{SOURCE}")
    lab.client.update_replication_rule(extra, {"lifetime": -3600})
    assert [(f.kind, f.subject) for f in sweep(s)] == [("rule-expired", f"lst:{rolled}")], \
        "the reconciler sweeps the rolled-on dataset too"


def orphans_as_before(lab: Lab, s: Settings, events: list[FileClosed]) -> None:
    """What ingest did before registering and attaching were one call: replicas registered (with their marks),
    the attach refused."""
    lab.client.add_replicas(SOURCE, [
        {"scope": "lst", "name": e.path, "bytes": e.size, "adler32": e.adler32, "pfn": f"file://localhost{e.path}",
         "meta": {marks.PATH: e.path, marks.DATASET: f"lst:{dataset(lab)}", marks.STREAM: s.streams[0].name}}
        for e in events])


def test_existing_orphans_are_named_by_reconcile_and_status_and_attached_onwards_by_fix_with_next(lab, tmp_path):
    s = settings_for(lab)
    first, lost = night_files(lab, 0, 1), night_files(lab, 1, 3)
    with declared(s):
        ingested(s, first)
        orphans_as_before(lab, s, lost)
        lab.client.set_status("lst", dataset(lab), open=False)
        found = sweep(s, fix=True)
        assert Counter((f.kind, f.action) for f in found) == {("orphaned", "report"): 3}
        assert sorted(f.subject for f in found) == sorted(f"lst:{e.path}" for e in lost)
        assert all(f"dataset lst:{dataset(lab)} is closed" in f.detail and "reopen" in f.detail for f in found)
        done = cli(config_file(s, tmp_path / "injector.toml"), "reconcile", expect=1)
        assert done.returncode == 1 and done.stdout.count(" orphaned ") == 3
        counts = status.collect(s, ClientGateway(s.rucio))["streams"]["lst1-raw"][f"lst:{dataset(lab)}"]
        assert (counts["registered"], counts["orphaned"]) == (1, 3), "orphans are not counted as files of it"

        rolling = settings_for(lab, on_closed_dataset="next")
        assert Counter((f.kind, f.action) for f in sweep(rolling, fix=True)) == {("orphaned", "done"): 3}
        assert sweep(rolling) == []
    rolled = f"{dataset(lab)}.2"
    assert lab.content(rolled) == sorted(e.path for e in lost)
    assert [(r["rse_expression"], r["copies"]) for r in lab.rules(rolled)] == [(ARCHIVE, 1)]
    assert all(m[marks.DATASET] == f"lst:{rolled}" for m in json_marks(lab, [e.path for e in lost]).values())


class ClosingGateway(ClientGateway):
    """Ops close the dataset right after ingest's open check, before it registers the batch."""

    def __init__(self, s: Settings, lab: Lab) -> None:
        super().__init__(s.rucio)
        self.lab = lab
        self.closed = False

    def datasets_open(self, dids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], bool]:
        answer = super().datasets_open(dids)
        if not self.closed:
            self.lab.client.set_status("lst", dataset(self.lab), open=False)
            self.closed = True
        return answer


def test_a_dataset_closed_between_the_check_and_the_registration_registers_nothing_and_dead_letters(lab):
    s = settings_for(lab)
    first, caught = night_files(lab, 0, 1), night_files(lab, 1, 2)
    with declared(s):
        ingested(s, first)
        assert consume(s, caught, ClosingGateway(s, lab)) == {"dataset-closed": 2}
        dead = dead_letters(s)
        found = sweep(s)
    assert [h[deadletter.REASON] for h in dead] == ["dataset-closed"] * 2
    for h, e in zip(sorted(dead, key=lambda h: h[deadletter.ERROR]), caught, strict=True):
        assert h[deadletter.ERROR].startswith(f"lst:{e.path}: dataset lst:{dataset(lab)} was closed after this "
                                              "batch checked it, so the file was not registered")
    assert registered(lab) == [first[0].path], "one transaction: Rucio refused it whole, no orphan"
    assert found == []
