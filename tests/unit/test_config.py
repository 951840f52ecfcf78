import re

import pytest

from injector.config import load, parse
from injector.errors import ConfigError
from tests.conftest import STREAMS


def stream(**over):
    s = dict(STREAMS["streams"][0])
    s.update(over)
    return {"streams": [s]}


def test_valid_config_parses(settings):
    assert [s.name for s in settings.streams] == ["lst1-raw", "magic-raw"]
    assert settings.ingest.batch_size == 1000


def test_unknown_template_field_is_one_clear_error_naming_the_stream():
    with pytest.raises(ConfigError, match=r"streams\[0\] \(lst1-raw\).*unknown field\(s\) \['telescope'\]"):
        parse(stream(dataset="X_{telescope}"))


def test_relative_storage_root_is_refused():
    with pytest.raises(ConfigError, match="storage_root must be an absolute"):
        parse(stream(storage_root="data/lst1"))


def test_lower_case_rse_name_is_refused():
    with pytest.raises(ConfigError, match="source_rse"):
        parse(stream(source_rse="orm-buffer"))


def test_two_streams_matching_the_same_events_are_refused():
    s = STREAMS["streams"][0]
    with pytest.raises(ConfigError, match="both match"):
        parse({"streams": [s, {**s, "name": "other"}]})


def test_batch_size_above_rucio_limit_is_refused():
    with pytest.raises(ConfigError, match="ingest.batch_size"):
        parse({"ingest": {"batch_size": 5000}})


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="brokr"):
        parse({"brokr": {}})


def test_load_reads_toml_and_environment_override(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[broker]\nurls = ["amqp://a//"]\n')
    assert load(f, env={}).broker.urls == ["amqp://a//"]
    assert load(f, env={"RUCIO_INJECTOR_BROKER_URL": "amqp://b//,amqp://c//"}).broker.urls == [
        "amqp://b//", "amqp://c//"]


def test_missing_config_says_how_to_give_one():
    with pytest.raises(ConfigError, match="--config"):
        load(None, env={})


def test_broken_toml_is_reported_with_its_path(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[broker\n")
    with pytest.raises(ConfigError, match=str(f)):
        load(f, env={})


def test_streams_splitting_one_site_and_instrument_by_datatype_may_share_a_root():
    s = STREAMS["streams"][0]
    settings = parse({"streams": [{**s, "datatype": "raw"}, {**s, "name": "lst1-dl1", "datatype": "dl1",
                                                              "dataset": "LST1_{night}_dl1"}]})
    assert [x.storage_root for x in settings.streams] == ["/data/lst1", "/data/lst1"]


def test_a_datatype_split_with_another_scope_is_an_overlap_naming_both_streams():
    s = STREAMS["streams"][0]
    with pytest.raises(ConfigError, match="streams 'lst1-raw' and 'lst1-dl1' have overlapping storage roots: both are"):
        parse({"streams": [{**s, "datatype": "raw"}, {**s, "name": "lst1-dl1", "datatype": "dl1", "scope": "dl1"}]})


def test_roots_sharing_only_a_name_prefix_do_not_overlap():
    s = STREAMS["streams"][0]
    other = {**s, "name": "lst10-raw", "instrument": "LST10", "storage_root": "/data/lst10"}
    assert len(parse({"streams": [s, other]}).streams) == 2


def test_a_root_below_another_is_refused_whichever_comes_first():
    s = STREAMS["streams"][0]
    inner = {**s, "name": "lst1-sub", "instrument": "LST2", "storage_root": "/data/lst1/sub/"}
    for streams in ([s, inner], [inner, s]):
        with pytest.raises(ConfigError, match="/data/lst1/sub lies inside /data/lst1"):
            parse({"streams": streams})


def test_streams_of_two_sites_with_their_own_source_rses_may_spell_their_roots_alike():
    s = STREAMS["streams"][0]
    other = {**s, "name": "cta-s-raw", "site": "PARANAL", "instrument": "LST1", "source_rse": "PARANAL-BUFFER"}
    assert len(parse({"streams": [s, other]}).streams) == 2
    with pytest.raises(ConfigError, match="overlapping storage roots"):  # one site's two RSEs: one disk
        parse({"streams": [s, {**other, "site": s["site"], "instrument": "LST2"}]})


def test_stomp_hosts_are_parsed_once_into_addresses():
    c = parse({"cleanup": {"stomp_hosts": ["amq1.example:61613", "10.0.0.2:61614"]}}).cleanup
    assert c.stomp_addresses == [("amq1.example", 61613), ("10.0.0.2", 61614)]


@pytest.mark.parametrize("entry", ["amq1", "amq1:", ":61613", "amq1:stomp"])
def test_a_stomp_host_without_a_port_is_refused(entry):
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse({"cleanup": {"stomp_hosts": [entry]}})


def test_stomp_urls_make_an_activemq_only_site_with_credentials_and_failover_hosts_from_the_urls() -> None:
    s = parse({"broker": {"urls": ["stomp://daq:s%40cret@amq1:61613", "stomp://daq:s%40cret@amq2:61614"],
                                 "heartbeat": 20},
                      "cleanup": {"flavour": "activemq", "hermes_destination": "/topic/VirtualTopic.rucio.events"}})
    assert s.broker.transport == "stomp" and parse({}).broker.transport == "amqp"
    server = s.broker.stomp
    assert server.addresses == (("amq1", 61613), ("amq2", 61614)) and server.hosts == "amq1:61613, amq2:61614"
    assert (server.username, server.password, server.heartbeat_ms) == ("daq", "s@cret", 20000)


@pytest.mark.parametrize(("data", "says"), [
    ({"broker": {"urls": ["stomp://u:p@amq:61613", "amqp://u:p@rabbit:5672//"]}}, "one protocol"),
    ({"broker": {"urls": ["stomp://u:p@amq"]}}, "the port is required"),
    ({"broker": {"urls": ["stomp://u:p@amq:61613"]}}, 'flavour = "activemq"'),
])
def test_a_broker_config_that_cannot_work_is_refused_saying_why(data: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse(data)


def test_the_shipped_example_config_loads_and_names_files_independently_of_the_buffer_mount():
    from pathlib import Path

    from injector.streams import did_name

    example = Path(__file__).resolve().parents[2] / "examples" / "injector.toml"
    s = load(example, env={"RUCIO_INJECTOR_BROKER_PASSWORD": "x" * 16, "RUCIO_INJECTOR_CLEANUP_PASSWORD": "y" * 16})
    assert [st.name for st in s.streams] == ["lst1-raw", "magic-raw"]
    assert all(st.rules[0].rse_expression == "PIC-ARCHIVE" and st.require_signature for st in s.streams)
    lst = s.stream_named("lst1-raw")
    name = did_name(lst, "/fefs/onsite/data/lst1/20261124/LST-1.1.Run00042.0000.fits.fz")
    assert name == "lst1/raw/20261124/LST-1.1.Run00042.0000.fits.fz", "the mount point is not in the name"
    assert s.broker.password is not None and "x" * 16 in s.broker.connect_urls[0]
    assert set(s.signing.keys) == {"orm-2026a", "orm-2026b"} and s.signing.sign_with == "orm-2026b"


def test_any_field_can_come_from_the_environment_as_a_toml_value(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[ingest]\nbatch_size = 1000\n[[streams]]\nname = "lst1-raw"\nsite = "ORM"\ninstrument = "LST1"\n'
                    'source_rse = "ORM-BUFFER"\nstorage_root = "/data/lst1"\nscope = "lst"\n'
                    'dataset = "LST1_{night}_raw"\nrules = [{ rse_expression = "PIC-ARCHIVE" }]\n')
    s = load(path, env={"RUCIO_INJECTOR__INGEST__BATCH_SIZE": "500", "rucio_injector__metrics__ingest_port": "0",
                        "RUCIO_INJECTOR__STREAMS__0__DATASET": "LST1_{date}_raw",
                        "RUCIO_INJECTOR__STREAMS__0__RELEASE_SOURCE": "false",
                        "RUCIO_INJECTOR__CLEANUP__STOMP_HOSTS": '["a:61613", "b:61613"]',
                        "RUCIO_INJECTOR__BROKER__DAQ_EXCHANGE": "orm.daq"})
    assert s.ingest.batch_size == 500 and s.metrics.ingest_port == 0 and s.broker.daq_exchange == "orm.daq"
    assert s.streams[0].dataset == "LST1_{date}_raw" and s.streams[0].release_source is False
    assert s.cleanup.stomp_hosts == ["a:61613", "b:61613"]


@pytest.mark.parametrize("name, says", [
    ("RUCIO_INJECTOR__STREAMS__3__DATASET", "the file has no streams[3]"),
    ("RUCIO_INJECTOR__INGEST__BATCH_SIZE__X", "ingest.batch_size is not a section"),
    ("RUCIO_INJECTOR____X", "empty name part"),
])
def test_an_environment_override_that_names_nothing_is_refused_naming_the_variable(tmp_path, name, says):
    path = tmp_path / "c.toml"
    path.write_text('[ingest]\nbatch_size = 1000\n')
    with pytest.raises(ConfigError, match=re.escape(says)):
        load(path, env={name: "1"})


def test_a_wrong_value_from_the_environment_is_refused_like_one_in_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("")
    with pytest.raises(ConfigError, match="ingest.batch_size"):
        load(path, env={"RUCIO_INJECTOR__INGEST__BATCH_SIZE": "5000"})


def test_the_readmes_example_configuration_is_valid():
    import tomllib
    from pathlib import Path

    from injector.config import parse

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = text[text.index("```toml\n", text.index("## Configure")) + 8:]
    block = block[:block.index("```")]
    s = parse(tomllib.loads(block))
    assert s.streams[0].did_name == "relative" and s.streams[0].did_prefix == "lst1/raw/"
