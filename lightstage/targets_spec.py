"""Calibration-target *specifications*: the ColorChecker 24 layout and its reference
reflectances, and the ChArUco board definition.

These describe physical equipment (what a stage knows about its chart and board), so both the
digital twin (which renders them, :mod:`lightstage.twin.targets`) and the calibration (which
detects and fits them) read them from here; neither owns them.

References
----------
McCamy, C. S., Marcus, H., Davidson, J. G. (1976). A color-rendition chart. J. Appl. Photogr.
    Eng. 2(3). (ColorChecker layout; reference values from colour-science.)
Garrido-Jurado, S. et al. (2014). Automatic generation and detection of highly reliable
    fiducial markers under occlusion. Pattern Recognition 47(6). (ArUco/ChArUco.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BoardSpec",
    "ChartSpec",
    "DEFAULT_BOARD",
    "DEFAULT_CHART",
    "colorchecker_reference",
    "charuco_board",
]


@dataclass(frozen=True)
class BoardSpec:
    """A ChArUco board: ``squares`` = (columns, rows), lengths in metres, OpenCV dictionary."""

    squares: tuple[int, int] = (9, 7)
    square: float = 0.028
    marker: float = 0.021
    dictionary: str = "DICT_4X4_50"

    @property
    def size(self) -> tuple[float, float]:
        """(width, height) in metres."""
        return self.squares[0] * self.square, self.squares[1] * self.square

    def to_dict(self) -> dict[str, Any]:
        return {"squares": list(self.squares), "square": self.square, "marker": self.marker,
                "dictionary": self.dictionary}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BoardSpec":
        return cls(tuple(int(v) for v in d["squares"]), float(d["square"]), float(d["marker"]),
                   str(d["dictionary"]))


@dataclass(frozen=True)
class ChartSpec:
    """ColorChecker 24 layout: 6 x 4 patches, ``pitch`` between patch centres, square
    ``patch`` side, ``margin`` of dark frame around the patch grid (metres)."""

    pitch: float = 0.042
    patch: float = 0.035
    margin: float = 0.012
    frame_albedo: float = 0.03
    reference: str = "ColorChecker24 - After November 2014"

    @property
    def size(self) -> tuple[float, float]:
        gap = self.pitch - self.patch
        return 6 * self.pitch - gap + 2 * self.margin, 4 * self.pitch - gap + 2 * self.margin

    def patch_centres(self) -> np.ndarray:
        """(24, 2) patch centres in chart coordinates (x right, y down, metres), row-major
        from the top-left patch ('dark skin')."""
        off = self.margin + self.patch / 2
        j, i = np.meshgrid(np.arange(6), np.arange(4))
        return np.stack([off + j.ravel() * self.pitch, off + i.ravel() * self.pitch], axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {"pitch": self.pitch, "patch": self.patch, "margin": self.margin,
                "frame_albedo": self.frame_albedo, "reference": self.reference}


DEFAULT_BOARD = BoardSpec()
DEFAULT_CHART = ChartSpec()


def colorchecker_reference(name: str = DEFAULT_CHART.reference) -> np.ndarray:
    """(24, 3) patch reflectances in linear Rec.709 (D65), row-major from 'dark skin'.

    colour-science's xyY values (D50, ICC) are chromatically adapted to D65 with Bradford.
    One patch (cyan) is slightly outside Rec.709 (negative red); the value is kept as is so
    the twin and the calibration agree on one linear reference.
    """
    import colour

    cc = colour.CCS_COLOURCHECKERS[name]
    XYZ = colour.xyY_to_XYZ(np.array(list(cc.data.values()), dtype=np.float64))
    return colour.XYZ_to_RGB(XYZ, colour.RGB_COLOURSPACES["sRGB"], illuminant=cc.illuminant,
                             chromatic_adaptation_transform="Bradford")


def charuco_board(spec: BoardSpec = DEFAULT_BOARD):
    """The OpenCV ``CharucoBoard`` of a spec (the board definition detectors and renderers
    share)."""
    import cv2

    d = cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, spec.dictionary))
    return cv2.aruco.CharucoBoard(tuple(spec.squares), spec.square, spec.marker, d)
