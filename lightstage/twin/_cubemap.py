"""Cube-map textures over the unit sphere of directions (internal helper of the twin).

A direction s is assigned to the face of its largest-magnitude component a (face ``2a`` for
s_a > 0, ``2a + 1`` otherwise) and mapped to gnomonic coordinates u = s_b / |s_a|,
v = s_c / |s_a| with (a, b, c) cyclic. Each face holds N x N texel centres plus a one-texel
border (evaluated at the border's own directions, just past the face edge) so bilinear lookups
never leave a face. No trigonometry is needed per lookup (numpy's atan2 costs ~30 multiplies
here), which is why the twin's star-shaped surfaces use a cube map rather than angles.

Shapes: a texture is ``(6 * (N + 2)**2, C)`` float32, one row per texel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CubeMap", "Lookup", "row_view"]


@dataclass
class Lookup:
    """Bilinear lookup of M directions: 4 flat texel indices and 4 weights (each (M,))."""

    idx: tuple
    w: tuple

    def sample(self, tex: np.ndarray) -> np.ndarray:
        """Interpolate a ``(T, C)`` float32 texture at the M directions -> (M, C)."""
        # gathering whole rows as opaque records is several times faster than fancy indexing
        C = tex.shape[1]
        rows = row_view(tex)
        out = np.take(rows, self.idx[0]).view(tex.dtype).reshape(-1, C) * self.w[0][:, None]
        for k in range(1, 4):
            out += np.take(rows, self.idx[k]).view(tex.dtype).reshape(-1, C) * self.w[k][:, None]
        return out

    def sample1(self, tex: np.ndarray) -> np.ndarray:
        """Interpolate a ``(T,)`` texture -> (M,)."""
        out = np.take(tex, self.idx[0]) * self.w[0]
        for k in range(1, 4):
            out += np.take(tex, self.idx[k]) * self.w[k]
        return out


def row_view(tex: np.ndarray) -> np.ndarray:
    """A C-contiguous (T, C) array viewed as (T,) opaque records (for fast row gathers)."""
    tex = np.ascontiguousarray(tex)
    return tex.view(np.dtype((np.void, tex.dtype.itemsize * tex.shape[1]))).ravel()


class CubeMap:
    """Geometry of an N x N-per-face cube map with one-texel borders."""

    def __init__(self, n: int):
        self.n = int(n)
        self.p = self.n + 2
        self.size = 6 * self.p * self.p

    def texel_directions(self) -> np.ndarray:
        """Unit directions (T, 3) float64 of every texel (borders included)."""
        n, p = self.n, self.p
        c = -1 + (np.arange(p) - 0.5) * 2.0 / n  # texel centres, border at +-(1 + 1/n)
        v, u = np.meshgrid(c, c, indexing="ij")
        dirs = np.empty((6, p, p, 3))
        for face in range(6):
            a, sgn = divmod(face, 2)
            b, cc = (a + 1) % 3, (a + 2) % 3
            dirs[face, ..., a] = -1.0 if sgn else 1.0
            dirs[face, ..., b] = u
            dirs[face, ..., cc] = v
        dirs = dirs.reshape(-1, 3)
        return dirs / np.linalg.norm(dirs, axis=1, keepdims=True)

    def lookup(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> Lookup:
        """Bilinear lookup for directions given as component arrays (M,) (need not be unit)."""
        ax, ay, az = np.abs(x), np.abs(y), np.abs(z)
        is_x = (ax >= ay) & (ax >= az)
        is_y = ~is_x & (ay >= az)
        is_z = ~(is_x | is_y)
        # (major, b, c) = (x, y, z) | (y, z, x) | (z, x, y) selected without nested wheres
        major = np.where(is_x, x, np.where(is_y, y, z))
        sb = np.where(is_x, y, np.where(is_y, z, x))
        sc = np.where(is_x, z, np.where(is_y, x, y))
        h = self.n * 0.5
        inv = h / np.abs(major)
        fu = sb * inv + (h + 0.5)  # padded texel coordinate, in [0.5, n + 0.5]
        fv = sc * inv + (h + 0.5)
        iu = np.minimum(fu.astype(np.int32), self.n)
        iv = np.minimum(fv.astype(np.int32), self.n)
        wu = (fu - iu).astype(np.float32)
        wv = (fv - iv).astype(np.float32)
        face = is_y.astype(np.int32) * 2 + is_z.astype(np.int32) * 4 + (major < 0)
        base = face * (self.p * self.p) + iv * self.p + iu
        idx = (base, base + 1, base + self.p, base + self.p + 1)
        uw = 1 - wu
        w = (uw * (1 - wv), wu * (1 - wv), uw * wv, wu * wv)
        return Lookup(idx, w)

    def grid(self, tex: np.ndarray) -> np.ndarray:
        """View a (T, ...) texture as (6, N + 2, N + 2, ...)."""
        return tex.reshape((6, self.p, self.p) + tex.shape[1:])
