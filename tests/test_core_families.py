"""One model-family vocabulary (magic_core.families) and how each user of it keeps its own answer."""

from __future__ import annotations

import pytest

from magic_core import families
from magic_core import ipadapter as ipa
from magic_core import layers as L


@pytest.mark.parametrize(("spelling", "family"), [
    ("SD 1.5", "sd15"), ("sd1", "sd15"), ("sd-xl", "sdxl"), ("XL", "sdxl"), ("sd2.1", "sd2x"), ("Kolors", "kolors"),
])
def test_spellings_name_one_family(spelling, family):
    assert families.normalize(spelling) == family


def test_unknown_spellings_and_layer_tables():
    assert families.normalize("flux") is None
    assert all(families.is_unknown(x) for x in (None, "", " Unknown ", "any"))
    assert not families.is_unknown("sd15")
    assert [families.layer_table_family(f) for f in families.FAMILIES] == ["sd15", "sd15", "sdxl", None]


def test_layer_tables_know_sd15_and_sdxl_only():
    assert L.normalize_family("SD1.5") == "sd15"
    with pytest.raises(L.LayerSpecError, match=r"unknown model family 'sd2x'; supported: sd15, sdxl"):
        L.normalize_family("sd2x")


def test_ipadapter_knows_every_family_and_unknown():
    assert ipa.normalize_family("sd 2.1") == "sd2x"
    assert ipa.normalize_family("unknown") == "unknown"
    with pytest.raises(ipa.IPAdapterError, match=r"unknown model family 'flux'; known: sd15, sd2x, sdxl, kolors"):
        ipa.normalize_family("flux")
