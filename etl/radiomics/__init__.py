"""IBSI radiomics features of a segmented region, checked against pyradiomics.

Implemented feature classes: ``firstorder`` and ``shape`` (3-D), with the
definitions and default settings of pyradiomics 3 (fixed bin width 25, no
resampling). The texture classes (GLCM, GLRLM, GLSZM, GLDM, NGTDM) are not
implemented yet; a parameter file that asks for them is rejected.

>>> from etl.radiomics import Params, extract
>>> values = extract(image, mask, Params.default())   # {(class, name): value}
"""

from etl.radiomics.extract import EXTRACTOR_VERSION, FEATURE_CLASSES, extract
from etl.radiomics.params import Params, ParamsError

__all__ = ["EXTRACTOR_VERSION", "FEATURE_CLASSES", "Params", "ParamsError", "extract"]
