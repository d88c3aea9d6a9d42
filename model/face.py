"""Single-image portrait preprocessing: load, detect the face, FFHQ/EG3D-style crop, camera pose.

The model (a triplane head prior in EG3D's head frame) expects portraits cropped the way EG3D's
FFHQ data was cropped, plus EG3D's 25-float camera label. This module does that for one photo:

1. :func:`load_portrait` reads a photo (8/16-bit PNG, JPEG, TIFF incl. float, EXR, ``.hdr``;
   grey, RGB or RGBA) into **linear** Rec.709 float32. 8/16-bit integer files are decoded with the
   sRGB transfer function; float files are taken as linear already. Alpha is composited over
   black in linear light (premultiplied), the only physically meaningful choice without a
   background plate.
2. :class:`MTCNNDetector` finds faces and 5 landmarks (eye centres, nose tip, mouth corners; in
   image order: image-left first). It is our own implementation of the MTCNN cascade
   (Zhang et al. 2016) -- the detector EG3D's FFHQ preprocessing uses -- running the P/R/O-Net
   weights that ship inside the PyPI package ``facenet-pytorch`` (2.6.0). Only the three weight
   files are used, read with ``torch.load(weights_only=True)`` (they are plain state dicts); the
   package itself is never imported, so neither its old torch/torchvision pins nor a torchvision
   stand-in are needed. Install it with ``pip install --no-deps facenet-pytorch==2.6.0``.
   Without it, give the landmarks (or a crop box) yourself; :class:`FaceDetectorUnavailable`
   says so.
3. :func:`align_face` reproduces EG3D's ``crop_images_in_the_wild.py`` (Deep3DFaceRecon's
   ``align_img``): a weak-perspective fit (POS) of the 5 landmarks to the BFM 5-point template
   ``LM3D_STD`` gives a scale and the template origin's image position; the image is scaled so
   that one template unit is 300 px of a 1024 px window centred there, the centre 700 px are kept
   and resized to the output size (512 in FFHQ; the model's resolution here). We compose this into
   one similarity transform (:class:`Alignment`) so it can be applied to any other image of the
   same view (e.g. OLAT frames, as 3DPR does) and inverted. Resampling happens on linear data.
4. :func:`estimate_pose` solves PnP (OpenCV SQPnP + Levenberg-Marquardt) between the aligned
   landmarks and the template placed in EG3D's head frame (:data:`LM5_EG3D`), with EG3D's
   normalised intrinsics (focal 4.2647, principal point at the centre), and moves the camera
   along its ray to EG3D's radius 2.7 (EG3D's ``fix_pose_orig``). A model trained on other faces
   passes its own template (:func:`fit_landmark_template` triangulates one from landmarks seen
   by known cameras; the bundled twin model ships one), since nose shape and pitch cannot be
   told apart in one photo.

Conventions: pixel centres at integer coordinates (OpenCV); landmarks are ``(5, 2)`` arrays of
``(x, y)`` pixels; camera poses are OpenCV cam2world in EG3D's head frame (y up, face towards +z).

References
----------
Zhang, K. et al. (2016). Joint face detection and alignment using multitask cascaded
convolutional networks (MTCNN). IEEE Signal Processing Letters 23(10).
Deng, Y. et al. (2019). Accurate 3D face reconstruction with weakly-supervised learning
(Deep3DFaceRecon): the POS fit and the BFM 5-point template.
Chan, E. R. et al. (2022). Efficient Geometry-aware 3D GANs (EG3D): FFHQ crop and pose labels
(``crop_images_in_the_wild.py``, ``3dface2idr_mat.py``, ``preprocess_face_cameras.py``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "PortraitError",
    "NoFaceFound",
    "FaceDetectorUnavailable",
    "LM3D_STD",
    "LM5_EG3D",
    "FaceDetection",
    "Alignment",
    "PreparedPortrait",
    "load_portrait",
    "srgb_decode",
    "srgb_encode",
    "display_uint8",
    "facenet_weights_dir",
    "detector_available",
    "MTCNNDetector",
    "pos_fit",
    "align_face",
    "alignment_from_box",
    "canonical_landmarks",
    "estimate_pose",
    "fit_landmark_template",
    "prepare_portrait",
]


class PortraitError(ValueError):
    """A portrait that cannot be used; the message names the file and the reason."""


class NoFaceFound(PortraitError):
    """The detector found no face in the image."""


class FaceDetectorUnavailable(RuntimeError):
    """The MTCNN weights (shipped in the ``facenet-pytorch`` package) are not installed."""


# BFM09 5-point template (Deep3DFaceRecon's ``load_lm3d`` of ``similarity_Lm3D_all.mat``):
# left-eye centre, right-eye centre, nose tip, left and right mouth corner (image order, y up,
# z towards the camera), BFM units (about 1 dm).
LM3D_STD = np.array(
    [
        [-0.31148657, 0.29036078, 0.13377953],
        [0.30979887, 0.28972036, 0.13179526],
        [0.0032535, -0.04617932, 0.55244243],
        [-0.25216928, -0.38133916, 0.22405732],
        [0.2484662, -0.38128236, 0.22235769],
    ],
    dtype=np.float64,
)

# The same template in EG3D's head frame: EG3D's 3dface2idr_mat.py maps BFM camera centres by
# x 0.27 and + (0, 0.006, 0.161); applying that similarity to the points puts the eyes at
# z ~ 0.2, EG3D's look-at pivot.
LM5_EG3D = LM3D_STD * 0.27 + np.array([0.0, 0.006, 0.161])

EG3D_RADIUS = 2.7
EG3D_FOCAL = 4.2647  # normalised focal (2985.29 px / 700 px); kept local: model/ uses camera.py's too


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def srgb_decode(v: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear (IEC 61966-2-1 piecewise curve), float32."""
    v = np.asarray(v, dtype=np.float32)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4).astype(np.float32)


def srgb_encode(v: np.ndarray) -> np.ndarray:
    """Linear -> sRGB encoding (clipped to [0, 1] first), float32. Display use only."""
    v = np.clip(np.asarray(v, dtype=np.float32), 0.0, 1.0)
    return np.where(v <= 0.0031308, 12.92 * v, 1.055 * np.power(v, 1 / 2.4) - 0.055).astype(
        np.float32
    )


def _read_raw(path: Path) -> tuple[np.ndarray, bool]:
    """Array as stored (H, W[, C]) and whether it is float (linear) data. RGB(A) order."""
    suffix = path.suffix.lower()
    if suffix == ".exr":
        import OpenEXR

        with OpenEXR.File(str(path)) as f:
            ch = f.channels()
            if "RGB" in ch:
                arr = np.asarray(ch["RGB"].pixels, dtype=np.float32)
            elif "RGBA" in ch:
                arr = np.asarray(ch["RGBA"].pixels, dtype=np.float32)
            elif all(c in ch for c in "RGB"):
                arr = np.stack([np.asarray(ch[c].pixels, np.float32) for c in "RGB"], axis=-1)
            elif "Y" in ch:
                arr = np.asarray(ch["Y"].pixels, dtype=np.float32)
            else:
                raise PortraitError(f"{path}: EXR has no R,G,B or Y channels ({sorted(ch)})")
        return arr, True
    if suffix in (".tif", ".tiff"):
        import tifffile

        arr = tifffile.imread(str(path))
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = np.moveaxis(arr, 0, -1)  # planar TIFF
        return arr, np.issubdtype(arr.dtype, np.floating)
    if suffix in (".png", ".hdr", ".pic"):
        import cv2

        # IMREAD_UNCHANGED keeps 16-bit depth and alpha (and is the only correct .hdr read).
        arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise PortraitError(f"{path}: not a readable image (OpenCV could not decode it)")
        if arr.ndim == 3:
            arr = arr[..., [2, 1, 0, 3][: arr.shape[2]]] if arr.shape[2] in (3, 4) else arr
        return arr, np.issubdtype(arr.dtype, np.floating)
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = 400_000_000  # allow large photos; we downscale for detection
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)  # phone JPEGs store rotation in EXIF
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im).astype(np.uint16)
        elif im.mode == "F":
            arr = np.asarray(im, dtype=np.float32)
            return arr, True
        else:
            if im.mode not in ("L", "LA", "RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            arr = np.asarray(im)
    return arr, False


def load_portrait(path: str | Path) -> np.ndarray:
    """Read a photo as linear Rec.709 RGB.

    Parameters
    ----------
    path : file path (PNG 8/16-bit, JPEG, TIFF 8/16-bit/float, EXR, Radiance HDR, BMP, WebP...).

    Returns
    -------
    (H, W, 3) float32, linear. Integer files: sRGB-decoded from code values / (2^bits - 1).
    Float files: returned as stored (linear). Grey is replicated to RGB; alpha is composited
    over black in linear light.

    Raises
    ------
    PortraitError : missing/unreadable file, unsupported layout, non-finite or empty data.
    """
    path = Path(path)
    if not path.is_file():
        raise PortraitError(f"{path}: no such file")
    try:
        arr, is_float = _read_raw(path)
    except PortraitError:
        raise
    except Exception as e:  # every decoder has its own exception types
        raise PortraitError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (2, 3, 4)):
        raise PortraitError(f"{path}: unsupported image layout {arr.shape} (want H x W x 1-4)")
    if min(arr.shape[:2]) < 16:
        raise PortraitError(f"{path}: image too small ({arr.shape[1]}x{arr.shape[0]} px)")
    if is_float:
        img = arr.astype(np.float32)
        if not np.all(np.isfinite(img)):
            raise PortraitError(f"{path}: image contains NaN or infinite values")
        img = np.maximum(img, 0.0)
        alpha = None
        if img.ndim == 3 and img.shape[2] in (2, 4):
            img, alpha = img[..., :-1], np.clip(img[..., -1:], 0.0, 1.0)
    else:
        if arr.dtype == np.uint8:
            scale = 255.0
        elif arr.dtype == np.uint16:
            scale = 65535.0
        elif arr.dtype == bool:
            scale = 1.0
        else:
            raise PortraitError(f"{path}: unsupported pixel type {arr.dtype}")
        v = arr.astype(np.float32) / scale
        alpha = None
        if v.ndim == 3 and v.shape[2] in (2, 4):
            v, alpha = v[..., :-1], v[..., -1:]
        img = srgb_decode(v)
    if img.ndim == 2 or img.shape[2] == 1:
        img = np.repeat(img.reshape(img.shape[0], img.shape[1], 1), 3, axis=2)
    if alpha is not None:
        img = img * alpha  # over black; alpha is coverage, so it multiplies linear radiance
    return np.ascontiguousarray(img, dtype=np.float32)


def display_uint8(linear: np.ndarray) -> np.ndarray:
    """Linear RGB -> sRGB uint8 for the detector (trained on sRGB photos) and for viewing.

    HDR input (max > 1) is scaled so that its 99.5th percentile maps to 1 first: this is display
    encoding for a detector only, never applied to the data that is cropped.
    """
    x = np.asarray(linear, dtype=np.float32)
    if x.size and float(x.max()) > 1.0:
        p = float(np.percentile(x, 99.5))
        if p > 0:
            x = x / p
    return np.round(srgb_encode(x) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# MTCNN (our implementation of the cascade; weights from the facenet-pytorch wheel)
# --------------------------------------------------------------------------------------------


def facenet_weights_dir() -> Path | None:
    """Folder holding ``pnet.pt``, ``rnet.pt``, ``onet.pt`` from facenet-pytorch, or None.

    Found via the import system's metadata without importing the package (its ``__init__``
    imports torchvision, which our stack does not have).
    """
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "data"
        if all((d / f"{n}.pt").is_file() for n in ("pnet", "rnet", "onet")):
            return d
    return None


def detector_available() -> bool:
    """True when the MTCNN weights are installed (``pip install --no-deps facenet-pytorch==2.6.0``)."""
    return facenet_weights_dir() is not None


_INSTALL_HINT = (
    "face detection needs the MTCNN weights shipped in the PyPI package facenet-pytorch: "
    "`pip install --no-deps facenet-pytorch==2.6.0` (no other dependency is needed), "
    "or pass the 5 landmarks / a crop box yourself"
)


def _build_nets():
    import torch
    from torch import nn

    class _PNet(nn.Module):
        # Fully convolutional 12x12 proposal net; parameter names match the shipped state dict.
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
            self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
            self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
            self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
            return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)

    class _RNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
            self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
            self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.prelu3(self.conv3(x))
            # The weights were converted from Caffe/MATLAB (column-major): flatten as (W, H, C).
            x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
            return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)

    class _ONet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
            self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
            self.dense6_1, self.dense6_2 = nn.Linear(256, 2), nn.Linear(256, 4)
            self.dense6_3 = nn.Linear(256, 10)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu4(self.conv4(x))
            x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
            return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)

    return _PNet(), _RNet(), _ONet()


def _nms(boxes: np.ndarray, scores: np.ndarray, thr: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; boxes (N, 4) x1, y1, x2, y2 (continuous). Kept indices."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes.T
    area = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
        order = rest[inter / np.maximum(denom, 1e-12) <= thr]
    return np.asarray(keep, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow boxes (N, >=4) to squares about their centres (MTCNN's ``rerec``)."""
    b = boxes.copy()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = np.maximum(w, h)
    b[:, 0] += 0.5 * (w - side)
    b[:, 1] += 0.5 * (h - side)
    b[:, 2] = b[:, 0] + side
    b[:, 3] = b[:, 1] + side
    return b


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Apply MTCNN's box regression (offsets in units of box width/height)."""
    b = boxes.copy()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    b[:, 0] += reg[:, 0] * w
    b[:, 1] += reg[:, 1] * h
    b[:, 2] += reg[:, 2] * w
    b[:, 3] += reg[:, 3] * h
    return b


@dataclass(frozen=True)
class FaceDetection:
    """One detected face.

    Attributes
    ----------
    box : (4,) float, x1, y1, x2, y2 in pixels of the image given to the detector.
    score : ONet face probability in [0, 1].
    landmarks : (5, 2) float (x, y): left eye, right eye, nose, left and right mouth corner
        (left = image left).
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray


class MTCNNDetector:
    """MTCNN face detector (P-Net proposals, R-Net refinement, O-Net boxes + 5 landmarks).

    Parameters
    ----------
    min_face_size : smallest face side searched, in pixels of the (possibly downscaled) image;
        None: ``max(20, min(H, W) / 10)`` -- a portrait's face is large, and a face smaller than
        that would be upsampled many times by the crop anyway. Smaller values search smaller
        faces (slower: the P-Net pyramid starts at a larger scale).
    thresholds : face-probability thresholds of the three stages (MTCNN's defaults).
    factor : scale step of the image pyramid.
    max_side : images larger than this are downscaled (area filter) for detection; landmarks
        are returned in the original pixel coordinates.

    Raises
    ------
    FaceDetectorUnavailable : facenet-pytorch (which ships the weights) is not installed.
    """

    def __init__(
        self,
        min_face_size: float | None = None,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        max_side: int = 1024,
    ):
        import torch

        d = facenet_weights_dir()
        if d is None:
            raise FaceDetectorUnavailable(_INSTALL_HINT)
        self.pnet, self.rnet, self.onet = _build_nets()
        for net, name in ((self.pnet, "pnet"), (self.rnet, "rnet"), (self.onet, "onet")):
            sd = torch.load(d / f"{name}.pt", map_location="cpu", weights_only=True)
            net.load_state_dict(sd)
            net.eval().requires_grad_(False)
        self.min_face_size = None if min_face_size is None else float(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = float(factor)
        self.max_side = int(max_side)

    # ---- helpers -----------------------------------------------------------------------
    @staticmethod
    def _crops(img, boxes: np.ndarray, size: int):
        """Square crops of ``boxes`` (integer-rounded, zero-padded outside), resized to size."""
        import torch
        import torch.nn.functional as F

        _, _, H, W = img.shape
        out = []
        for x1, y1, x2, y2 in np.round(boxes[:, :4]).astype(np.int64):
            x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
            patch = torch.zeros((1, 3, y2 - y1, x2 - x1), dtype=img.dtype)
            sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, W), min(y2, H)
            if sx2 > sx1 and sy2 > sy1:
                patch[:, :, sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = img[:, :, sy1:sy2, sx1:sx2]
            out.append(F.interpolate(patch, size=(size, size), mode="area"))
        return (torch.cat(out) - 127.5) / 128.0

    def detect(self, image: np.ndarray) -> list[FaceDetection]:
        """Detect faces.

        Parameters
        ----------
        image : (H, W, 3) uint8 sRGB (use :func:`display_uint8` for linear data).

        Returns
        -------
        Detections sorted by decreasing box area (the main subject first).
        """
        import cv2
        import torch
        import torch.nn.functional as F

        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise PortraitError(f"detector input must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        H0, W0 = image.shape[:2]
        ds = min(1.0, self.max_side / max(H0, W0))
        if ds < 1.0:
            image = cv2.resize(image, (max(1, round(W0 * ds)), max(1, round(H0 * ds))),
                               interpolation=cv2.INTER_AREA)
            ds_x, ds_y = image.shape[1] / W0, image.shape[0] / H0
        else:
            ds_x = ds_y = 1.0
        H, W = image.shape[:2]
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        t1, t2, t3 = self.thresholds

        with torch.no_grad():
            # Stage 1: P-Net over an image pyramid; one 12x12 cell per output pixel (stride 2).
            mfs = self.min_face_size or max(20.0, min(H, W) / 10.0)
            m = 12.0 / mfs
            scales, side = [], min(H, W) * m
            while side >= 12:
                scales.append(m * self.factor ** len(scales))
                side *= self.factor
            cand = []
            for s in scales:
                hs, ws = int(np.ceil(H * s)), int(np.ceil(W * s))
                x = (F.interpolate(img, size=(hs, ws), mode="area") - 127.5) / 128.0
                reg, prob = self.pnet(x)
                p = prob[0, 1].numpy()
                ys, xs = np.nonzero(p >= t1)
                if len(ys) == 0:
                    continue
                r = reg[0].numpy()[:, ys, xs].T
                b = np.stack([2 * xs / s, 2 * ys / s, (2 * xs + 12) / s, (2 * ys + 12) / s], 1)
                b = np.concatenate([b, p[ys, xs, None], r], axis=1)
                cand.append(b[_nms(b[:, :4], b[:, 4], 0.5)])
            if not cand:
                return []
            b = np.concatenate(cand)
            b = b[_nms(b[:, :4], b[:, 4], 0.7)]
            boxes = _square(np.concatenate([_regress(b[:, :4], b[:, 5:9]), b[:, 4:5]], 1))

            # Stage 2: R-Net on 24x24 crops.
            reg, prob = self.rnet(self._crops(img, boxes, 24))
            keep = prob[:, 1].numpy() >= t2
            if not keep.any():
                return []
            boxes, reg = boxes[keep], reg.numpy()[keep]
            boxes[:, 4] = prob[:, 1].numpy()[keep]
            k = _nms(boxes[:, :4], boxes[:, 4], 0.7)
            boxes = _square(np.concatenate([_regress(boxes[k, :4], reg[k]), boxes[k, 4:5]], 1))

            # Stage 3: O-Net on 48x48 crops: final boxes and landmarks.
            reg, pts, prob = self.onet(self._crops(img, boxes, 48))
            score = prob[:, 1].numpy()
            keep = score >= t3
            if not keep.any():
                return []
            boxes, reg, pts, score = boxes[keep], reg.numpy()[keep], pts.numpy()[keep], score[keep]
            w = (boxes[:, 2] - boxes[:, 0])[:, None]
            h = (boxes[:, 3] - boxes[:, 1])[:, None]
            lx = boxes[:, 0:1] + w * pts[:, 0:5]
            ly = boxes[:, 1:2] + h * pts[:, 5:10]
            final = _regress(boxes[:, :4], reg)
            k = _nms(final, score, 0.7, mode="min")

        dets = []
        for i in k:
            box = final[i] / np.array([ds_x, ds_y, ds_x, ds_y])
            lm = np.stack([lx[i] / ds_x, ly[i] / ds_y], axis=1)
            dets.append(FaceDetection(box=box, score=float(score[i]), landmarks=lm))
        dets.sort(key=lambda d: -(d.box[2] - d.box[0]) * (d.box[3] - d.box[1]))
        return dets


# --------------------------------------------------------------------------------------------
# Alignment (EG3D / Deep3DFaceRecon align_img, composed into one similarity transform)
# --------------------------------------------------------------------------------------------


def pos_fit(lm2d: np.ndarray, lm3d: np.ndarray = LM3D_STD) -> tuple[np.ndarray, float]:
    """Weak-perspective fit ``x = s * P R X + t`` of 2-D points to 3-D points (POS).

    Parameters
    ----------
    lm2d : (N, 2) image points with **y up** (Deep3DFaceRecon flips y before fitting).
    lm3d : (N, 3) template points.

    Returns
    -------
    t : (2,) image position of the template origin (y up); s : scale, pixels per template unit.

    Notes
    -----
    Linear least squares on the 8 entries of the 2x4 affine camera; ``s`` is the mean norm of
    its two rotation rows (Deng et al. 2019, ``POS``).
    """
    lm2d = np.asarray(lm2d, np.float64)
    lm3d = np.asarray(lm3d, np.float64)
    n = len(lm2d)
    A = np.zeros((2 * n, 8))
    A[0::2, 0:3], A[0::2, 3] = lm3d, 1.0
    A[1::2, 4:7], A[1::2, 7] = lm3d, 1.0
    b = lm2d.reshape(-1)
    k, *_ = np.linalg.lstsq(A, b, rcond=None)
    s = 0.5 * (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7]))
    return np.array([k[3], k[7]]), float(s)


@dataclass(frozen=True)
class Alignment:
    """A similarity transform from original image pixels to the aligned crop.

    Attributes
    ----------
    matrix : (2, 3) float64, ``[x_out, y_out] = matrix @ [x, y, 1]`` (pixel centres at
        integers in both images).
    size : output side in pixels (square crop).
    source_shape : (H, W) of the original image.
    """

    matrix: np.ndarray
    size: int
    source_shape: tuple[int, int]

    @property
    def scale(self) -> float:
        """Output pixels per input pixel."""
        return float(np.hypot(self.matrix[0, 0], self.matrix[1, 0]))

    def apply_points(self, pts: np.ndarray) -> np.ndarray:
        """Map (N, 2) original pixel coordinates to the crop."""
        pts = np.asarray(pts, np.float64)
        return pts @ self.matrix[:, :2].T + self.matrix[:, 2]

    def inverse_points(self, pts: np.ndarray) -> np.ndarray:
        """Map (N, 2) crop coordinates back to the original image."""
        M = np.vstack([self.matrix, [0, 0, 1]])
        Mi = np.linalg.inv(M)[:2]
        pts = np.asarray(pts, np.float64)
        return pts @ Mi[:, :2].T + Mi[:, 2]

    def warp(self, image: np.ndarray) -> np.ndarray:
        """Apply the crop to an image (H, W, C) of the same view (any float data; linear).

        Downscaling is done with an area filter first (no aliasing), the remaining sub-pixel
        similarity with Lanczos; pixels outside the source are 0.
        """
        import cv2

        img = np.asarray(image)
        if img.shape[:2] != tuple(self.source_shape):
            raise PortraitError(
                f"image shape {img.shape[:2]} differs from the aligned source {self.source_shape}"
            )
        img = np.ascontiguousarray(img, dtype=np.float32)
        M = self.matrix.copy()
        s = self.scale
        if s < 1.0:
            # Pre-shrink by (about) s so the warp itself resamples near 1:1.
            h, w = img.shape[:2]
            nw, nh = max(1, round(w * s)), max(1, round(h * s))
            sx, sy = nw / w, nh / h
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
            # resize maps centres x -> (x + 0.5) * sx - 0.5; undo it in the residual warp.
            P = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])
            M = (np.vstack([M, [0, 0, 1]]) @ np.linalg.inv(P))[:2]
        ch = img.shape[2] if img.ndim == 3 else 1
        # warpAffine handles at most 4 channels at a time.
        planes = [img] if ch <= 4 else [img[..., i : i + 4] for i in range(0, ch, 4)]
        out = [
            cv2.warpAffine(np.ascontiguousarray(p), M, (self.size, self.size),
                           flags=cv2.INTER_LANCZOS4, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            for p in planes
        ]
        out = [o[..., None] if o.ndim == 2 and img.ndim == 3 else o for o in out]
        res = np.concatenate(out, axis=-1) if len(out) > 1 else out[0]
        # Lanczos rings below zero at hard edges; radiance cannot be negative.
        return np.maximum(res, 0.0).astype(np.float32)


def align_face(
    landmarks: np.ndarray,
    image_shape: tuple[int, int],
    size: int = 512,
    target_size: float = 1024.0,
    rescale_factor: float = 300.0,
    center_crop: float = 700.0,
) -> Alignment:
    """EG3D's in-the-wild crop from 5 landmarks, as one similarity transform.

    Parameters
    ----------
    landmarks : (5, 2) image pixels (x, y down), in :data:`LM3D_STD` order.
    image_shape : (H, W) of the image.
    size : output side (EG3D: 512; use the model's resolution).
    target_size, rescale_factor, center_crop : EG3D's ``align_img`` window (1024), template
        scale (300 px per template unit in that window) and centre crop (700).

    Returns
    -------
    :class:`Alignment`. The template origin lands at the crop centre; one template unit spans
    ``rescale_factor * size / center_crop`` output pixels (219.4 px at 512).

    Notes
    -----
    EG3D resizes, crops at integer offsets and resizes again (sub-pixel rounding differences of
    at most one 1024-window pixel); this composes the exact continuous transform.
    ``target_size`` matters only as the window that is cropped centrally, so only
    ``center_crop`` enters the maths.
    """
    lm = np.asarray(landmarks, np.float64)
    if lm.shape != (5, 2) or not np.all(np.isfinite(lm)):
        raise PortraitError(f"landmarks must be a finite (5, 2) array, got {lm.shape}")
    H, W = int(image_shape[0]), int(image_shape[1])
    flipped = np.stack([lm[:, 0], (H - 1) - lm[:, 1]], axis=1)
    t, s_pos = pos_fit(flipped, LM3D_STD)
    if not np.isfinite(s_pos) or s_pos <= 1e-6:
        raise PortraitError("degenerate landmarks (the 5 points do not span a face)")
    del target_size  # the 1024 window is centred on t: only the 700 centre crop remains
    k = rescale_factor / s_pos * size / center_crop  # output px per input px
    cx, cy = t[0], (H - 1) - t[1]
    c = 0.5 * size - 0.5  # output centre in pixel-centre coordinates
    M = np.array([[k, 0.0, c - k * cx], [0.0, k, c - k * cy]])
    return Alignment(matrix=M, size=int(size), source_shape=(H, W))


def alignment_from_box(box, image_shape: tuple[int, int], size: int = 512) -> Alignment:
    """A user-given square-ish crop box ``(x1, y1, x2, y2)`` (pixels) as an :class:`Alignment`.

    The box is made square about its centre (the larger side) and mapped onto the output.
    Use a box framed like FFHQ (face about half the width, eyes a bit above the centre).
    """
    b = np.asarray(box, np.float64).reshape(-1)
    if b.shape != (4,) or not np.all(np.isfinite(b)) or b[2] <= b[0] or b[3] <= b[1]:
        raise PortraitError(f"crop box must be finite (x1, y1, x2, y2) with x2 > x1, y2 > y1: {box}")
    side = max(b[2] - b[0], b[3] - b[1])
    cx, cy = 0.5 * (b[0] + b[2]), 0.5 * (b[1] + b[3])
    k = size / side
    # Box edges are pixel edges: edge x1 - 0.5 ... x2 - 0.5 in centre coordinates is ignored;
    # we map the box centre to the output centre.
    c = 0.5 * size - 0.5
    M = np.array([[k, 0.0, c - k * (cx - 0.5)], [0.0, k, c - k * (cy - 0.5)]])
    return Alignment(matrix=M, size=int(size), source_shape=(int(image_shape[0]), int(image_shape[1])))


def canonical_landmarks(size: int = 512, rescale_factor: float = 300.0,
                        center_crop: float = 700.0) -> np.ndarray:
    """Where :func:`align_face` puts a frontal face's 5 landmarks (orthographic template view).

    Returns (5, 2) pixels of a ``size`` crop: the template's (x, -y) scaled by
    ``rescale_factor * size / center_crop`` about the crop centre.
    """
    k = rescale_factor * size / center_crop
    c = 0.5 * size - 0.5
    return np.stack([c + k * LM3D_STD[:, 0], c - k * LM3D_STD[:, 1]], axis=1)


# --------------------------------------------------------------------------------------------
# Pose
# --------------------------------------------------------------------------------------------


def _K_pixels(size: int) -> np.ndarray:
    # EG3D: normalised fx = 4.2647, cx = 0.5 with pixel centres at (i + 0.5) / R, so in
    # OpenCV pixel-centre coordinates cx = R/2 - 0.5.
    f = EG3D_FOCAL * size
    c = 0.5 * size - 0.5
    return np.array([[f, 0, c], [0, f, c], [0, 0, 1]], dtype=np.float64)


def _template(template) -> np.ndarray:
    if template is None:
        return LM5_EG3D.astype(np.float64)
    t = np.asarray(template, np.float64)
    if t.shape != (5, 3) or not np.all(np.isfinite(t)):
        raise PortraitError(f"landmark template must be a finite (5, 3) array, got shape {t.shape}")
    return t


def fit_landmark_template(landmarks_crop: np.ndarray, cam2worlds: np.ndarray, size: int) -> np.ndarray:
    """The 3D landmark template (5, 3) in the head frame that explains observed crop landmarks
    from known cameras: linear (DLT) triangulation of each landmark over all observations.

    landmarks_crop (N, 5, 2) pixels in ``size`` aligned crops, as :func:`prepare_portrait` gives
    them (``meta['landmarks_crop']``); cam2worlds (N, 4, 4) the true EG3D head-frame cameras of
    those views (radius 2.7). The intrinsics are EG3D's (what :func:`estimate_pose` assumes),
    so the detector's own placement of the points and the crop's effect are both absorbed:
    :func:`estimate_pose` with the fitted template is unbiased on faces like those observed.
    Pooling several subjects gives their mean face.
    """
    lm = np.asarray(landmarks_crop, np.float64).reshape(-1, 5, 2)
    c2w = np.asarray(cam2worlds, np.float64).reshape(-1, 4, 4)
    if len(lm) != len(c2w) or len(lm) < 2:
        raise PortraitError(f"need >= 2 views with landmarks and cameras, got {len(lm)} and {len(c2w)}")
    K = _K_pixels(size)
    P = []
    for c in c2w:
        R = c[:3, :3].T
        P.append(K @ np.concatenate([R, (-R @ c[:3, 3])[:, None]], 1))
    out = np.empty((5, 3))
    for j in range(5):
        rows = []
        for Pi, (u, v) in zip(P, lm[:, j]):
            rows += [u * Pi[2] - Pi[0], v * Pi[2] - Pi[1]]
        _, _, vt = np.linalg.svd(np.asarray(rows))
        X = vt[-1]
        out[j] = X[:3] / X[3]
    return out


def estimate_pose(landmarks_crop: np.ndarray, size: int, radius: float = EG3D_RADIUS,
                  template: np.ndarray | None = None) -> np.ndarray:
    """EG3D camera pose (cam2world in the head frame) from 5 landmarks in the aligned crop.

    Parameters
    ----------
    landmarks_crop : (5, 2) pixels in a ``size`` x ``size`` aligned crop.
    size : crop side.
    radius : distance of the camera from the head-frame origin (EG3D: 2.7).
    template : (5, 3) head-frame landmark template (default :data:`LM5_EG3D`, the FFHQ/BFM
        convention of real faces); a model trained on other faces carries its own
        (:func:`fit_landmark_template`; the bundled twin model's is in its bundle.json).

    Returns
    -------
    (4, 4) float64 OpenCV cam2world. Use :func:`lightstage.camera.eg3d_label` for the label.

    Notes
    -----
    PnP (SQPnP, refined by Levenberg-Marquardt) against :data:`LM5_EG3D` with EG3D's intrinsics,
    then the camera centre is moved along its line to the origin onto the radius-2.7 sphere,
    keeping the rotation (EG3D's ``fix_pose_orig``). Five landmarks cannot pin the distance
    well; the sphere constraint removes that freedom.

    Accuracy: exact for landmarks that follow the template (tests). On digital-twin renders with
    known cameras (MTCNN landmarks, 5 held-out subjects x 5 poses) the BFM template gives a mean
    error of 13 deg, almost all of it pitch (+12.6 deg: camera read as too high): the twin's
    stylised heads have the nose point at 0.64 of the eye-to-mouth height where real faces (and
    the template) have it at ~0.5, which PnP can only read as pitch. With the template fitted
    to the twin's training subjects the error drops to a few degrees (tests/test_face.py). The
    geometry of one face in one photo cannot separate nose shape from pitch; EG3D itself takes
    the pose from a full 3DMM fit (Deep3DFaceRecon), which is not available offline here; pass
    ``cam2world`` to :func:`prepare_portrait` when a better pose is known.
    """
    import cv2

    p2 = np.asarray(landmarks_crop, np.float64).reshape(5, 2)
    if not np.all(np.isfinite(p2)):
        raise PortraitError("landmarks for pose estimation are not finite")
    K = _K_pixels(size)
    obj = _template(template)
    ok, rvec, tvec = cv2.solvePnP(obj, p2, K, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        raise PortraitError("pose estimation failed (PnP found no solution)")
    rvec, tvec = cv2.solvePnPRefineLM(obj, p2, K, None, rvec, tvec)
    R, _ = cv2.Rodrigues(rvec)
    t = tvec.reshape(3)
    c2w = np.eye(4)
    c2w[:3, :3] = R.T
    centre = -R.T @ t
    n = np.linalg.norm(centre)
    if not np.isfinite(n) or n < 1e-6 or (R.T @ np.array([0, 0, 1.0])) @ -centre <= 0:
        raise PortraitError("pose estimation gave a camera not facing the head")
    c2w[:3, 3] = centre / n * radius
    return c2w


# --------------------------------------------------------------------------------------------
# Whole pipeline
# --------------------------------------------------------------------------------------------


@dataclass
class PreparedPortrait:
    """A portrait ready for inversion.

    Attributes
    ----------
    image : (size, size, 3) float32 linear RGB crop.
    cam2world : (4, 4) EG3D head-frame camera (OpenCV).
    label : (25,) float32 EG3D camera label.
    alignment : the crop transform (apply it to other images of the same view).
    landmarks : (5, 2) landmarks in the original image, or None (box crop).
    source : where the crop came from: 'detected', 'landmarks' or 'box'.
    detection : the chosen :class:`FaceDetection`, when detected.
    """

    image: np.ndarray
    cam2world: np.ndarray
    label: np.ndarray
    alignment: Alignment
    landmarks: np.ndarray | None
    source: str
    detection: FaceDetection | None = None
    meta: dict = field(default_factory=dict)


def prepare_portrait(
    image: str | Path | np.ndarray,
    size: int = 512,
    landmarks: np.ndarray | None = None,
    box=None,
    cam2world: np.ndarray | None = None,
    detector: MTCNNDetector | None = None,
    template: np.ndarray | None = None,
) -> PreparedPortrait:
    """Load (if a path), detect, align, and estimate the pose of one portrait.

    Parameters
    ----------
    image : a file path or a (H, W, 3) float32 **linear** RGB array.
    size : output side (the model's resolution).
    landmarks : optional (5, 2) landmarks (original pixels): skips detection.
    box : optional crop box (x1, y1, x2, y2): skips detection and landmarks; the pose is then
        ``cam2world`` or EG3D's frontal camera.
    cam2world : optional (4, 4) pose that overrides the estimate.
    detector : a reusable :class:`MTCNNDetector` (constructed on demand otherwise).
    template : (5, 3) landmark template for the pose (:func:`estimate_pose`; default the
        FFHQ/BFM one).

    Raises
    ------
    PortraitError, NoFaceFound, FaceDetectorUnavailable : with the file name and the reason.
    """
    from lightstage.camera import EG3D_FRONT_CAM2WORLD, eg3d_label

    name = str(image) if isinstance(image, (str, Path)) else "<array>"
    img = load_portrait(image) if isinstance(image, (str, Path)) else np.asarray(image, np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise PortraitError(f"{name}: expected (H, W, 3) linear RGB, got {img.shape}")
    if not np.all(np.isfinite(img)):
        raise PortraitError(f"{name}: image contains NaN or infinite values")
    det = None
    if box is not None and landmarks is None:
        al = alignment_from_box(box, img.shape[:2], size)
        crop = al.warp(img)
        pose = np.asarray(cam2world, np.float64) if cam2world is not None else EG3D_FRONT_CAM2WORLD.copy()
        return PreparedPortrait(crop, pose, eg3d_label(pose), al, None, "box")
    if landmarks is None:
        try:
            detector = detector or MTCNNDetector()
        except FaceDetectorUnavailable as e:
            raise FaceDetectorUnavailable(f"{name}: {e}") from None
        dets = detector.detect(display_uint8(img))
        if not dets:
            raise NoFaceFound(
                f"{name}: no face found (MTCNN); pass the 5 landmarks or a crop box if the face is "
                "there but not detected"
            )
        det = dets[0]
        lm, source = det.landmarks, "detected"
    else:
        lm, source = np.asarray(landmarks, np.float64), "landmarks"
        if lm.shape != (5, 2):
            raise PortraitError(f"{name}: landmarks must be (5, 2), got {lm.shape}")
    al = align_face(lm, img.shape[:2], size)
    crop = al.warp(img)
    lm_crop = al.apply_points(lm)
    pose = (np.asarray(cam2world, np.float64) if cam2world is not None
            else estimate_pose(lm_crop, size, template=template))
    return PreparedPortrait(crop, pose, eg3d_label(pose), al, np.asarray(lm), source, det,
                            meta={"landmarks_crop": lm_crop})
