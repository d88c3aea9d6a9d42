"""Importers of third-party light-stage datasets into the lightstage store."""

__all__ = ["faceolat"]
