"""lightstage: multi-view OLAT light-stage captures to calibrated HDR datasets (the ground floor:
rig, file formats, raw/HDR, store, relighting maths, digital twin). Imports none of
``calibration``, ``model`` or ``cli``."""

__version__ = "0.1.0"
