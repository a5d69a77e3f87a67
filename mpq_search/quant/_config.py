"""QuantConfig (defined in the torch-free `mpq_search.config`) and the uniform-setting parser."""

from __future__ import annotations

from mpq_search.bitmap import LayerBits
from mpq_search.choices import ACT_CALIBRATIONS as ACT_CALIBRATIONS  # re-exported
from mpq_search.choices import ACT_RANGES as ACT_RANGES
from mpq_search.choices import KERNELS as KERNELS
from mpq_search.choices import ActCalibration as ActCalibration
from mpq_search.choices import ActRanges as ActRanges
from mpq_search.choices import Kernel as Kernel
from mpq_search.config import QuantConfig as QuantConfig


def parse_setting(text: str) -> LayerBits:
    """Parse a uniform setting such as "W4A8" (weight bits, activation bits; 16/32 = float).

    An alias of `LayerBits.parse`, kept for existing callers: the notation has one parser.
    """
    return LayerBits.parse(text)
