from operations.status import STAGES, render


def test_status_shows_names_and_errors_holding_markup_as_they_are(capsys):
    data = {"streams": {"[red]s": {"lst:[/bold]ds ünï": dict.fromkeys(STAGES, 1)}},
            "queues": {"q[/x]": "missing (NotFound [/red]); run `rucio-injector broker setup`",
                       "[b]q2": {"messages": 3, "consumers": 1}}}
    render(data)
    out = capsys.readouterr().out
    for text in ("stream [red]s", "lst:[/bold]ds ünï", "q[/x]", "NotFound [/red]", "[b]q2"):
        assert text in out, out
