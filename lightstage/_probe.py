"""Compiled kernels that are built, and checked against a reference, once per process.

numba is optional for lightstage: a kernel module is imported (compiled or loaded from numba's
on-disk cache) on first use and run on a probe whose answer is known; if anything fails — no
numba, an LLVM or CPU without a needed instruction, a wrong result — callers take their
reference path instead of getting wrong numbers. ``LIGHTSTAGE_NO_NUMBA=1`` disables every
kernel (to test or time the reference paths).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

__all__ = ["VerifiedKernel"]


class VerifiedKernel:
    """``build()`` returns the verified kernel (or raises); :meth:`available` runs it once."""

    def __init__(self, build: Callable[[], Any]):
        self._build = build
        self._lock = threading.Lock()
        self._done = False
        self.kernel: Any = None
        self.why = "not built"

    def available(self) -> bool:
        """Whether the kernel can be used here (built and verified); see :attr:`why` if not."""
        with self._lock:
            if not self._done:
                if os.environ.get("LIGHTSTAGE_NO_NUMBA"):
                    self.why = "disabled by LIGHTSTAGE_NO_NUMBA"
                else:
                    try:
                        self.kernel, self.why = self._build(), ""
                    except Exception as e:  # no numba, no instruction support, a wrong probe
                        self.kernel, self.why = None, f"{type(e).__name__}: {e}"
                self._done = True
            return self.kernel is not None
