"""pipeline.data.layouts: the registry of layouts, their capabilities, and the one lookup everyone uses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.core.config import DataConfig
from pipeline.data import DataError
from pipeline.data.check import check_dataset
from pipeline.data.layouts import LAYOUTS, Layout, layout, read_competition, read_source


def test_every_layout_is_a_frozen_entry_with_a_reader():
    assert {"competition", "voc", "cityscapes"} <= set(LAYOUTS)
    for name, entry in LAYOUTS.items():
        assert isinstance(entry, Layout) and callable(entry.read), name
        with pytest.raises(dataclasses.FrozenInstanceError):
            entry.checkable = not entry.checkable  # type: ignore[misc]


def test_capabilities_of_the_builtin_layouts():
    comp, voc, cs = layout("competition"), layout("voc"), layout("cityscapes")
    assert comp.read is read_competition
    assert comp.rle_masks and comp.fixed_tile_size and comp.checkable
    for other in (voc, cs):
        assert not (other.rle_masks or other.fixed_tile_size or other.checkable)


def test_unknown_layout_names_the_choices():
    with pytest.raises(DataError, match=r"unknown data.layout 'vco'; choose one of \['cityscapes', "):
        layout("vco")
    with pytest.raises(DataError, match="unknown data.layout 'vco'"):
        read_source(DataConfig(layout="vco"))


def test_check_data_asks_the_registry_what_it_can_check(tmp_path: Path, monkeypatch):
    assert [p.code for p in check_dataset(tmp_path, DataConfig(layout="cityscapes")).warnings] == ["layout"]
    # A layout is checked because of its capability, not its name.
    monkeypatch.setitem(LAYOUTS, "mine", dataclasses.replace(LAYOUTS["competition"]))
    report = check_dataset(tmp_path, DataConfig(layout="mine"))
    assert "layout" not in {p.code for p in report.warnings} and "missing-csv" in {
        p.code for p in report.errors
    }
    report = check_dataset(tmp_path, DataConfig(layout="vco"))
    assert [p.code for p in report.errors] == ["layout"] and "cityscapes" in report.errors[0].what
