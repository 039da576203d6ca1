"""etl.leaveout: packages made to look uninstalled, and put back."""

import importlib
import sys

import pytest

from etl.leaveout import leave_out


def test_a_left_out_package_cannot_be_imported_until_restored():
    name = "tabnanny"  # a standard module nothing here imports
    sys.modules.pop(name, None)
    restore = leave_out([name])
    try:
        with pytest.raises(ModuleNotFoundError, match="left out of this process") as exc:
            importlib.import_module(name)
        assert exc.value.name == name
        importlib.import_module("colorsys")  # others import as before
    finally:
        restore()
    assert importlib.import_module(name).__name__ == name
    restore()  # twice: nothing happens


def test_nothing_is_left_out_when_the_package_is_imported_already():
    finders = list(sys.meta_path)
    restore = leave_out(["json", "tabnanny"])
    assert sys.meta_path == finders
    restore()
    assert sys.meta_path == finders
