"""The fault campaign's short run (CI): every fault kind at least once over two minutes of a steady DAQ, then
0 lost, 0 duplicated, no dead letter but the injected bad events. The long run: `make faults`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.faults.campaign import ACTIVEMQ_KINDS, KINDS, Campaign

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.mark.timeout(1500)
def test_two_minutes_of_every_fault_kind_lose_nothing_and_duplicate_nothing(tmp_path: Path) -> None:
    campaign = Campaign(tmp_path, minutes=float(os.environ.get("FAULT_MINUTES", "2")), rate=4.0,
                        seed=int(os.environ.get("FAULT_SEED", "1")), faults=len(KINDS + ACTIVEMQ_KINDS),
                        quiesce=600.0, outage_cap=20.0, hermes_broker="activemq")
    tally = campaign.run()
    print(f"\n{tally.line()}\n{json.dumps(tally.as_json())}")
    assert tally.problems == [], "\n".join(tally.problems[:20])
    assert (tally.lost, tally.duplicated, tally.dead_lettered) == (0, 0, 0)
    assert set(tally.faults) == set(KINDS + ACTIVEMQ_KINDS) and tally.files > 0
    assert tally.injected_bad == tally.faults["bad-event"]
