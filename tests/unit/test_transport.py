import subprocess
import sys

import pytest

from injector import transport

BROKER_LIBRARIES = ("kombu", "amqp", "stomp", "injector.transport.amqp", "injector.transport.stomp")


def imported_by(module: str) -> set[str]:
    """The broker modules importing `module` loads, in a fresh interpreter."""
    code = f"import sys, {module}; print(' '.join(m for m in {BROKER_LIBRARIES!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("module", ["injector.worker", "injector.transport", "injector.settle", "injector.exits",
                                    "injector.prerequisites"])
def test_the_batch_worker_the_transport_interface_and_the_cli_checks_import_no_broker_library(module: str) -> None:
    assert imported_by(module) == set()


def test_a_plugin_is_imported_only_when_asked_for_and_alone() -> None:
    code = ("import sys; from injector.transport import plugin; plugin('amqp'); "
            "print('kombu' in sys.modules, 'stomp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


@pytest.mark.parametrize("name", transport.PLUGINS)
def test_every_plugin_provides_link_and_explain(name: str) -> None:
    found = transport.plugin(name)
    assert callable(found.link) and callable(found.explain)
    assert found.explain(ValueError("not a broker's"), "amqp://h:5672/") is None


def test_an_unknown_plugin_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="amqp, stomp"):
        transport.plugin("zeromq")


def test_counts_in_headers_a_publisher_set_to_junk_read_as_none_so_far_not_a_crash():
    import amqp

    from injector.transport.amqp import to_delivery

    msg = amqp.Message(b"{}", application_headers={"x-delivery-count": "lots", "injector-retries": "x"})
    msg.delivery_info = {"delivery_tag": 7, "exchange": "daq", "routing_key": "file.closed.ORM.LST1"}
    d = to_delivery(msg, generation=1)
    assert (d.attempts, d.delivery_tag, d.exchange) == (1, 7, "daq")
