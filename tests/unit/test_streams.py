import os

import pytest

from injector.config import parse
from injector.errors import NoStream, PathNotCanonical, PathOutsideRoot, RucioRefused, TemplateFieldMissing
from injector.events import FileClosed
from injector.streams import canonical_path, could_name, owner, path_of, place, shares_names
from tests.conftest import STREAMS


def ev(**over):
    f = dict(site="ORM", instrument="LST1", path="/data/lst1/2026/11/24/run42.fits.fz", size=1,
             adler32="00000001", night="20261124")
    f.update(over)
    return FileClosed.create(**f)


def test_lst_event_is_placed_at_its_original_path(settings):
    p = place(settings.streams, ev())
    assert (p.scope, p.name) == ("lst", "/data/lst1/2026/11/24/run42.fits.fz")
    assert p.pfn == "file://localhost/data/lst1/2026/11/24/run42.fits.fz"
    assert p.dataset == "LST1_20261124_raw"
    assert p.stream.source_rse == "ORM-BUFFER"


def test_relative_did_name_and_date_datatype_template(settings):
    e = ev(instrument="MAGIC", path="/data/magic/M1/a.root", datatype="raw")
    p = place(settings.streams, e)
    assert p.name == "M1/a.root"
    assert p.dataset == f"MAGIC_{e.occurred_at:%Y%m%d}_raw"


def test_unknown_instrument_has_no_stream(settings):
    with pytest.raises(NoStream, match="instrument='LST2'"):
        place(settings.streams, ev(instrument="LST2"))


@pytest.mark.parametrize("path", ["/data/lst2/x", "/data/lst1/../etc/passwd", "/data/lst1//x", "/data/lst1/./x",
                                  "/data/lst1", "/data/lst1/x/", "//data/lst1/x"])
def test_paths_outside_the_root_or_not_normalised_are_refused(settings, path):
    with pytest.raises(PathOutsideRoot):
        place(settings.streams, ev(path=path))


def test_template_field_absent_from_the_event_is_named(settings):
    with pytest.raises(TemplateFieldMissing, match=r"\['night'\]"):
        place(settings.streams, ev(night=None))


def test_name_rucio_would_refuse_is_refused_before_calling_rucio(settings):
    with pytest.raises(RucioRefused, match="not a valid Rucio name"):
        place(settings.streams, ev(path="/data/lst1/bad name.fits"))


def symlinked_tree(tmp_path):
    """root/20261129/x.fits, root/alias -> 20261129, root/escape -> ../outside, link -> root."""
    (tmp_path / "root" / "20261129").mkdir(parents=True)
    (tmp_path / "root" / "20261129" / "x.fits").write_bytes(b"x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "y.fits").write_bytes(b"y")
    os.symlink("20261129", tmp_path / "root" / "alias")
    os.symlink("../outside", tmp_path / "root" / "escape")
    os.symlink("root", tmp_path / "link")
    return tmp_path


def lst1(root):
    return parse({"streams": [{**STREAMS["streams"][0], "storage_root": str(root)}]}).streams[0]


def test_the_canonical_path_resolves_symlinks_inside_the_root_and_keeps_the_configured_root(tmp_path):
    t = symlinked_tree(tmp_path)
    assert canonical_path(lst1(t / "root"), f"{t}/root/alias/x.fits") == f"{t}/root/20261129/x.fits"
    assert canonical_path(lst1(t / "link"), f"{t}/root/alias/x.fits") == f"{t}/link/20261129/x.fits"
    assert canonical_path(lst1(t / "link"), f"{t}/link/20261129/x.fits") == f"{t}/link/20261129/x.fits"


def test_a_symlink_whose_target_leaves_the_root_is_outside_it(tmp_path):
    t = symlinked_tree(tmp_path)
    with pytest.raises(PathOutsideRoot, match=f"its real path is '{t}/outside/y.fits'"):
        canonical_path(lst1(t / "root"), f"{t}/root/escape/y.fits")


def test_ingest_refuses_a_visible_non_canonical_path_and_keeps_lexical_checks_for_an_invisible_one(tmp_path):
    t = symlinked_tree(tmp_path)
    streams = [lst1(t / "root")]
    with pytest.raises(PathNotCanonical, match=f"field path '{t}/root/alias/x.fits'.*announce '{t}/root/20261129"):
        place(streams, ev(path=f"{t}/root/alias/x.fits"))
    assert place(streams, ev(path=f"{t}/root/20261129/x.fits")).name == f"{t}/root/20261129/x.fits"
    assert place(streams, ev(path=f"{t}/root/gone/x.fits")).name == f"{t}/root/gone/x.fits"


def test_a_datatype_specific_stream_beats_the_generic_one_and_the_generic_takes_the_rest():
    lst = STREAMS["streams"][0]
    split = parse({"streams": [
        {**lst, "name": "lst1-any"},
        {**lst, "name": "lst1-dl1", "datatype": "dl1", "dataset": "LST1_{night}_dl1"},
        {**lst, "name": "lst1-raw", "datatype": "raw"},
    ]}).streams
    chosen = {dt: place(split, ev(datatype=dt)).stream.name for dt in ("raw", "dl1", "dl2", None)}
    assert chosen == {"raw": "lst1-raw", "dl1": "lst1-dl1", "dl2": "lst1-any", None: "lst1-any"}
    only_specific = [s for s in split if s.datatype]
    with pytest.raises(NoStream):
        place(only_specific, ev(datatype="dl2"))


@pytest.mark.parametrize("bad", [dict(path="/data/lst1/../etc/x"), dict(path="/data/lst2/x"),
                                 dict(path="/data/lst1/bad name.fits"), dict(night=None)])
def test_every_refusal_names_the_event_it_refuses(settings, bad):
    event = ev(**bad)
    with pytest.raises((PathOutsideRoot, RucioRefused, TemplateFieldMissing)) as err:
        place(settings.streams, event)
    assert err.value.event_id == str(event.event_id)


def test_a_refused_name_says_whether_it_is_the_did_or_the_dataset_name(settings):
    with pytest.raises(RucioRefused, match="^DID name '/data/lst1/bad name.fits' is not a valid Rucio name"):
        place(settings.streams, ev(path="/data/lst1/bad name.fits"))
    spaced = parse({"streams": [{**STREAMS["streams"][0], "dataset": "LST1 {night}"}]}).streams
    with pytest.raises(RucioRefused, match=r"^dataset name \(template 'LST1 \{night\}'\) 'LST1 20261124'"):
        place(spaced, ev())


def test_the_path_follows_from_the_name_unless_the_name_is_a_basename():
    raw = parse(STREAMS).streams
    lst, magic = raw
    assert path_of(lst, "/data/lst1/20261124/run1.fits") == "/data/lst1/20261124/run1.fits"
    assert path_of(magic, "x/M1.root") == "/data/magic/x/M1.root"
    base = parse({"streams": [dict(STREAMS["streams"][1], did_name="basename", did_prefix="m/")]}).streams[0]
    assert path_of(base, "m/M1.root") is None and could_name(base, "magic", "m/M1.root")
    assert not could_name(base, "magic", "m/x/M1.root") and not could_name(magic, "magic", "/data/lst1/a")
    assert owner(raw, "lst", "/data/lst1/a") is lst and owner(raw, "lst", "/data/magic/a") is None
    assert not shares_names(lst, raw) and not shares_names(magic, raw)
    twins = parse({"streams": [dict(STREAMS["streams"][0], datatype="raw"),
                               dict(STREAMS["streams"][0], name="lst1-dl1", datatype="dl1")]}).streams
    assert all(shares_names(s, twins) for s in twins) and owner(twins, "lst", "/data/lst1/a") is None
