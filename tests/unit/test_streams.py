import pytest

from injector.errors import NoStream, PathOutsideRoot, RucioRefused, TemplateFieldMissing
from injector.events import FileClosed
from injector.streams import place


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
                                  "/data/lst1"])
def test_paths_outside_the_root_or_not_normalised_are_refused(settings, path):
    with pytest.raises(PathOutsideRoot):
        place(settings.streams, ev(path=path))


def test_template_field_absent_from_the_event_is_named(settings):
    with pytest.raises(TemplateFieldMissing, match=r"\['night'\]"):
        place(settings.streams, ev(night=None))


def test_name_rucio_would_refuse_is_refused_before_calling_rucio(settings):
    with pytest.raises(RucioRefused, match="not a valid Rucio name"):
        place(settings.streams, ev(path="/data/lst1/bad name.fits"))
