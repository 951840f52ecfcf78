from operations.status import STAGES, render


def test_status_shows_names_and_errors_holding_markup_as_they_are(capsys):
    data = {"streams": {"[red]s": {"lst:[/bold]ds ünï": dict.fromkeys(STAGES, 1)}},
            "queues": {"q[/x]": "missing (NotFound [/red]); run `rucio-injector broker setup`",
                       "[b]q2": {"messages": 3, "consumers": 1}}}
    render(data)
    out = capsys.readouterr().out
    for text in ("stream [red]s", "lst:[/bold]ds ünï", "q[/x]", "NotFound [/red]", "[b]q2"):
        assert text in out, out


def test_status_shows_the_outbox_of_this_host_when_its_file_exists(tmp_path, capsys):
    from injector.config import parse
    from operations.status import outbox_depth
    from producers.outbox import Outbox

    settings = parse({"outbox": {"path": str(tmp_path / "outbox.sqlite")}})
    assert outbox_depth(settings) is None  # no file here: not shown
    Outbox(settings.outbox).close()
    data = {"streams": {}, "queues": {}, "outbox": outbox_depth(settings)}
    assert data["outbox"] == {"path": str(tmp_path / "outbox.sqlite"), "events": 0}
    render(data)
    assert "0 event(s) waiting for the broker" in capsys.readouterr().out
