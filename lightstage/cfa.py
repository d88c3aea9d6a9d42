"""Colour filter array (CFA) patterns: one spelling shared by the rig, the twin's sensor, the DNG
writer and the raw decoder.

A CFA is written as a string of the letters ``R``, ``G``, ``B`` giving the colour of each
photosite of one period of the pattern, row-major, starting at the top-left photosite of the
(visible) image:

- a 2x2 Bayer pattern as its four letters, ``"RGGB"``, ``"BGGR"``, ``"GRBG"``, ``"GBRG"``
  (unchanged from earlier versions of lightstage);
- any other periodic pattern as its rows separated by ``/``, e.g. Fujifilm's 6x6 X-Trans
  ``"GGRGGB/GGBGGR/BRGRBG/GGBGGR/GGRGGB/RBGBRG"``. The name ``"X-Trans"`` (any case, with or
  without the hyphen) stands for that phase of it (:data:`XTRANS`).

A 2x2 pattern given with ``/`` (``"RG/GB"``) is the same CFA as its four letters;
:func:`cfa_string` always returns the canonical spelling (four letters for 2x2, rows with ``/``
otherwise), which is what :func:`lightstage.raw.read_raw` reports.

References
----------
Fujifilm X-Trans colour filter array: 6x6 period, 20 green, 8 red, 8 blue photosites, every
    row and column holding all three colours; the phase used here is dcraw's / LibRaw's
    ``xtrans_abs`` table (D. Coffin, dcraw.c, 2012 onwards).
Adobe (2012). Digital Negative (DNG) Specification 1.4.0.0: tag 33421 CFARepeatPatternDim
    (rows, columns of the period), 33422 CFAPattern (row-major colour codes, 0 R, 1 G, 2 B).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "CFAError",
    "BAYER_PATTERNS",
    "XTRANS",
    "CFA_INDEX",
    "parse_cfa",
    "cfa_string",
    "is_bayer",
    "cfa_index_map",
    "MAX_PERIOD",
]

#: the four phases of the 2x2 Bayer pattern
BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
#: Fujifilm X-Trans, in the phase of dcraw's ``xtrans_abs`` (rows separated by ``/``)
XTRANS = "GGRGGB/GGBGGR/BRGRBG/GGBGGR/GGRGGB/RBGBRG"
#: CFA letter -> colour index (0 red, 1 green, 2 blue; also the DNG CFAPattern code)
CFA_INDEX = {"R": 0, "G": 1, "B": 2}
#: largest period (rows or columns) accepted; DNG readers allow up to 8 (LibRaw: 2x2, 4x4 in
#: dcraw's ``filters`` word, or 6x6 X-Trans)
MAX_PERIOD = 8

_ALIASES = {"X-TRANS": XTRANS, "XTRANS": XTRANS}


class CFAError(ValueError):
    """A CFA description that is not a valid pattern; the message says why."""


def parse_cfa(cfa: str) -> np.ndarray:
    """The ``(rows, cols)`` uint8 colour-index array (0 R, 1 G, 2 B) of one CFA period.

    Parameters
    ----------
    cfa : str
        ``"RGGB"``-style 2x2 letters, rows separated by ``/``, or ``"X-Trans"``.

    Raises
    ------
    CFAError
        When the string is not a rectangular pattern of R, G, B at most
        :data:`MAX_PERIOD` on a side, or lacks one of the three colours.
    """
    if not isinstance(cfa, str):
        raise CFAError(f"CFA pattern must be a string, got {type(cfa).__name__}")
    s = _ALIASES.get(cfa.strip().upper(), cfa.strip().upper())
    if "/" in s:
        rows = s.split("/")
    elif len(s) == 4:
        rows = [s[:2], s[2:]]
    else:
        raise CFAError(f"CFA pattern {cfa!r}: expected 4 letters (e.g. 'RGGB'), rows separated "
                       f"by '/' (e.g. {XTRANS!r}) or 'X-Trans'")
    if len({len(r) for r in rows}) != 1 or not rows[0]:
        raise CFAError(f"CFA pattern {cfa!r}: rows must be non-empty and of equal length")
    if len(rows) > MAX_PERIOD or len(rows[0]) > MAX_PERIOD:
        raise CFAError(f"CFA pattern {cfa!r}: period {len(rows)}x{len(rows[0])} exceeds "
                       f"{MAX_PERIOD}x{MAX_PERIOD}")
    bad = sorted({ch for r in rows for ch in r} - set(CFA_INDEX))
    if bad:
        raise CFAError(f"CFA pattern {cfa!r}: letters must be R, G or B, got {''.join(bad)!r}")
    p = np.array([[CFA_INDEX[ch] for ch in r] for r in rows], np.uint8)
    missing = [k for k, c in CFA_INDEX.items() if not (p == c).any()]
    if missing:
        raise CFAError(f"CFA pattern {cfa!r}: no {'/'.join(missing)} photosite")
    return p


def cfa_string(pattern: np.ndarray) -> str:
    """Canonical spelling of a ``(rows, cols)`` colour-index array (inverse of :func:`parse_cfa`).

    A pattern that repeats with a smaller period (a 4x4 array holding a 2x2 Bayer tile, say) is
    reduced to that period first."""
    p = np.asarray(pattern)
    if p.ndim != 2 or p.size == 0 or p.min() < 0 or p.max() > 2:
        raise CFAError(f"CFA pattern array must be 2-D with values 0..2, got {p!r}")
    p = _reduce(p)
    letters = "RGB"
    rows = ["".join(letters[int(v)] for v in r) for r in p]
    return "".join(rows) if p.shape == (2, 2) else "/".join(rows)


def _reduce(p: np.ndarray) -> np.ndarray:
    for axis in (0, 1):
        n = p.shape[axis]
        for d in range(1, n):
            if n % d == 0 and np.array_equal(p, np.roll(p, d, axis=axis)):
                p = p[:d] if axis == 0 else p[:, :d]
                break
    return p


def is_bayer(cfa: str | None) -> bool:
    """True for a 2x2 Bayer pattern (the fast, byte-stable demosaic path)."""
    if cfa is None:
        return False
    try:
        return cfa_string(parse_cfa(cfa)) in BAYER_PATTERNS
    except CFAError:
        return False


def cfa_index_map(cfa: str, height: int, width: int) -> np.ndarray:
    """``(H, W)`` uint8 colour index (0 R, 1 G, 2 B) of every photosite."""
    p = parse_cfa(cfa)
    n, m = p.shape
    return np.tile(p, (-(-height // n), -(-width // m)))[:height, :width]
