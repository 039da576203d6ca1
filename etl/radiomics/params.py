"""Radiomics parameter files: versioned YAML, validated against a JSON schema, hashed."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lakehouse.errors import LakeError


class ParamsError(LakeError):
    def __init__(self, source: str, detail: str):
        self.source = source
        self.detail = detail
        super().__init__(f"invalid radiomics parameters in {source}: {detail}")


def _resource(name: str) -> str:
    return resources.files("etl.radiomics").joinpath(name).read_text(encoding="utf-8")


def schema() -> dict:
    return json.loads(_resource("params.schema.json"))


@dataclass(frozen=True)
class Params:
    """A validated parameter set. ``raw`` is the file's content."""

    raw: dict[str, Any]
    source: str = "default.yaml"

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> Params:
        import jsonschema

        try:
            jsonschema.validate(data, schema())
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
            detail = f"{where}: {exc.message}"
            if exc.validator == "additionalProperties" and "featureClass" in where:
                detail += (" (implemented feature classes: firstorder, shape, glcm, glrlm, "
                           "glszm, gldm, ngtdm)")
            raise ParamsError(source, detail) from None
        wavelet = ((data.get("imageType") or {}).get("Wavelet") or {}).get("wavelet")
        if wavelet is not None:
            import pywt

            if wavelet not in pywt.wavelist(kind="discrete"):
                raise ParamsError(source, f"imageType/Wavelet/wavelet: {wavelet!r} is not a "
                                  "PyWavelets discrete wavelet (e.g. coif1, haar, db2, sym4)")
        return cls(copy.deepcopy(data), source)

    @classmethod
    def from_yaml(cls, text: str, source: str = "<yaml>") -> Params:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ParamsError(source, f"not valid YAML: {str(exc).splitlines()[0]}") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> Params:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ParamsError(str(path), exc.strerror or str(exc)) from None
        return cls.from_yaml(text, str(path))

    @classmethod
    def default(cls) -> Params:
        return cls.from_yaml(_resource("default.yaml"), "default.yaml")

    @property
    def version(self) -> int:
        return int(self.raw["version"])

    @property
    def setting(self) -> dict[str, Any]:
        return dict(self.raw.get("setting") or {})

    @property
    def feature_classes(self) -> dict[str, list[str]]:
        return {k: list(v or []) for k, v in self.raw["featureClass"].items()}

    @property
    def image_types(self) -> dict[str, dict[str, Any]]:
        """Enabled image types with their options (default: Original only)."""
        types = self.raw.get("imageType") or {"Original": {}}
        return {k: dict(v or {}) for k, v in types.items()}

    @property
    def hash(self) -> str:
        """SHA-256 of the canonical JSON of the parameters (what the features depend on)."""
        blob = json.dumps(self.raw, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def pyradiomics_settings(self) -> dict[str, Any]:
        """The same settings as keyword arguments of pyradiomics' extractor."""
        s = {k: v for k, v in self.setting.items() if v is not None}
        if s.pop("maskInterpolator", "sitkNearestNeighbor") != "sitkNearestNeighbor":
            raise ParamsError(self.source, "pyradiomics resamples the region by nearest "
                              "neighbour only: it has no maskInterpolator setting")
        s.pop("maskPartialVolumeThreshold", None)
        return s
