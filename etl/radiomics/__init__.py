"""IBSI radiomics features of a segmented region, checked against pyradiomics.

Feature classes: ``firstorder``, ``shape`` (3-D), ``glcm``, ``glrlm``,
``glszm``, ``gldm`` and ``ngtdm``, with the definitions and default settings
of pyradiomics 3 (fixed bin width 25, distance 1 in 3-D); normalization and
resampling (:mod:`etl.radiomics.preprocess`) and the LoG and wavelet image
types (:mod:`etl.radiomics.filters`) as pyradiomics does them. The tests
compare every feature with pyradiomics. Not implemented: 2-D (``force2D``)
texture, distances other than 1, voxel-based maps, the other image types
(square, gradient, LBP...), ``resegmentRange``; a parameter file that asks for
them is rejected.

>>> from etl.radiomics import Params, extract
>>> values = extract(image, mask, Params.default())   # {(class, name): value}
"""

from etl.radiomics.extract import EXTRACTOR_VERSION, FEATURE_CLASSES, extract
from etl.radiomics.params import Params, ParamsError

__all__ = ["EXTRACTOR_VERSION", "FEATURE_CLASSES", "Params", "ParamsError", "extract"]
