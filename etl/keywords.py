"""The keywords of DICOM tags, from pydicom's data dictionary, in a process that has not
loaded pydicom.

The ingest's driver names the attributes that differ between the two versions of a
conflicting instance, and never needs pydicom otherwise. Importing pydicom costs it
0.2-0.27 s (its pixel decoders and their plugins, its data downloads), about a tenth of a
20,000-file run. The dictionary itself is one module of plain data
(``pydicom/_dicom_dict.py``): loaded alone, from its compiled bytecode, it takes 5 ms.
A process that has loaded pydicom asks pydicom; so do the tests, for every tag of the
dictionary, repeating groups, private and unknown tags."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys


@functools.cache
def _dictionary() -> tuple[dict[int, tuple], list[tuple[int, int, str]]] | None:
    """pydicom's standard dictionary and its repeating-group masks ``(bits, care,
    keyword)``, loaded without the pydicom package; None where the module is not a
    plain file beside the package's ``__init__``, or not as expected."""
    spec = importlib.util.find_spec("pydicom")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "_dicom_dict.py")
    module_spec = importlib.util.spec_from_file_location("_lake_pydicom_dict", path)
    if module_spec is None or module_spec.loader is None or not os.path.isfile(path):
        return None
    try:  # a private module of pydicom's: any surprise in it, and pydicom is asked
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        masks = []
        # as pydicom.datadict builds them: ``care`` has 0 bits where the mask has an x
        for mask_x, entry in module.RepeatersDictionary.items():
            care = int("".join("F0"[c == "x"] for c in mask_x), 16)
            masks.append((int(mask_x.replace("x", "0"), 16), care, entry[4]))
        return dict(module.DicomDictionary), masks
    except Exception:
        return None


def keyword_for_tag(tag: int) -> str:
    """The keyword of ``tag`` in the DICOM dictionary, ``''`` if it has none (private and
    unknown tags): :func:`pydicom.datadict.keyword_for_tag`, without importing pydicom
    unless the process has already."""
    datadict = sys.modules.get("pydicom.datadict")
    tables = None if datadict is not None else _dictionary()
    if tables is None:
        from pydicom.datadict import keyword_for_tag as pydicom_keyword

        return pydicom_keyword(tag)
    return _standalone_keyword(tag, tables)


def _standalone_keyword(tag: int,
                        tables: tuple[dict[int, tuple], list[tuple[int, int, str]]]) -> str:
    dictionary, masks = tables
    entry = dictionary.get(tag)
    if entry is not None:
        return entry[4]
    if not (tag >> 16) % 2:  # private tags (odd groups) have no repeating-group entry
        for bits, care, keyword in masks:
            if (tag ^ bits) & care == 0:
                return keyword
    return ""
