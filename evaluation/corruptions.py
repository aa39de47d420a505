"""The ImageNet-C corruptions (Hendrycks & Dietterich, ICLR 2019), natively in numpy/scipy/OpenCV/PIL.

``corrupt(image, name, severity, seed)`` takes a uint8 image (H, W) or (H, W, C) with C in {1, 3} and
returns a uint8 image of the same shape. The 15 benchmark corruptions are ``IMAGENET_C``; the 4 held-out
ones from the paper are ``EXTRA``. Severities 1-5 use the published constants of ``make_imagenet_c.py``.

What differs from the reference code (also in docs/evaluation.md):

- No ImageMagick: motion blur (also inside ``snow``) is a one-sided Gaussian line kernel drawn with
  sub-pixel weights and applied with ``cv2.filter2D``, as ImageMagick's ``MotionBlurImage`` does.
- Frost blends ImageNet-C's own frost photographs when the ``imagecorruptions`` package (Apache-2.0,
  which ships them) is installed (``frost_source() == "imagenet-c"``), else a procedurally generated
  ice texture (``"generated"``, see ``_frost_texture``), which degrades images less (docs/evaluation.md).
- Glass blur's sequential pixel swaps are done in non-overlapping parallel phases (vectorised); each
  pixel still swaps once per iteration with a random neighbour within the published distance.
- Any size from 28 px up. Constants that are lengths in pixels (blur sigmas and radii, motion length,
  elastic displacement, spatter drops, frost texture scale) were set for 224 px images and are
  multiplied by ``length_scale(min(H, W))``: S/224 at and above 224 px (the corruption looks the same
  relative to the content), sqrt(S/224) below it (proportional scaling would push the severity-1 blurs
  under one pixel, where they do nothing). Pixel-level textures (glass blur, snowflake grain) are not
  shrunk below their published sizes. Relative constants (zoom factors, pixelation ratio, fog) and
  per-pixel ones (noise, brightness, contrast, saturation, JPEG quality) are used as published.
- Deterministic: all randomness comes from ``numpy.random.default_rng(seed)``, and every severity
  starts from the same seed, so severities differ by their constants, not by their random draws.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter, gaussian_filter1d

IMAGENET_C: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = IMAGENET_C + EXTRA
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
COLOUR_ONLY: frozenset[str] = frozenset({"saturate"})  # identity on single-channel images

# ITU-R BT.601 luma, what PIL's convert("L") uses: colours become grey this way on 1-channel images.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def length_scale(size: int) -> float:
    """Multiplier for constants measured in pixels of a 224-px image, for an image whose short side is ``size``."""
    ratio = size / 224.0
    return ratio if ratio >= 1.0 else math.sqrt(ratio)


def applicable(name: str, channels: int) -> bool:
    """Whether corruption ``name`` can change an image with ``channels`` channels (saturation needs colour)."""
    return not (channels == 1 and name in COLOUR_ONLY)


def corrupt(image: np.ndarray, name: str, severity: int, seed: int | Sequence[int] = 0) -> np.ndarray:
    """Corrupt a uint8 image; same shape and dtype out. ``seed`` may be a sequence (e.g. (seed, index))."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {list(ALL_CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    squeeze = image.ndim == 2
    x = image[..., None] if squeeze else image
    if x.ndim != 3 or x.shape[2] not in (1, 3):
        raise ValueError(f"expected (H, W), (H, W, 1) or (H, W, 3), got {image.shape}")
    if min(x.shape[:2]) < 8:
        raise ValueError(f"image too small for corruptions: {image.shape}")
    rng = np.random.default_rng(seed)
    k = length_scale(min(x.shape[:2]))
    out = CORRUPTIONS[name](x.astype(np.float32) / 255.0, severity, rng, k)
    out = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    return out[..., 0] if squeeze else out


# --------------------------------------------------------------------------------------------------
# helpers


def _grey(x: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (H, W, 1) luma."""
    return x if x.shape[2] == 1 else (x @ _LUMA)[..., None]


def _colour(rgb: Sequence[float], channels: int) -> np.ndarray:
    c = np.asarray(rgb, dtype=np.float32) / 255.0
    return c if channels == 3 else np.array([c @ _LUMA], dtype=np.float32)


def _blur(x: np.ndarray, sigma: float, truncate: float = 4.0, mode: str = "nearest") -> np.ndarray:
    """Gaussian blur over the two spatial axes only (skimage.filters.gaussian's behaviour)."""
    sigmas = (sigma, sigma, 0.0)[: x.ndim]
    return gaussian_filter(x, sigmas, mode=mode, truncate=truncate)


def _to_pil(x: np.ndarray) -> Image.Image:
    u8 = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(u8[..., 0] if u8.shape[2] == 1 else u8)


def _from_pil(img: Image.Image) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32) / 255.0
    return a[..., None] if a.ndim == 2 else a


def _zoom_about_centre(x: np.ndarray, factor: float) -> np.ndarray:
    """Magnify by ``factor`` about the image centre, keeping the size (ImageNet-C's ``clipped_zoom``)."""
    h, w = x.shape[:2]
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    m = np.float32([[factor, 0, (1 - factor) * cx], [0, factor, (1 - factor) * cy]])
    out = cv2.warpAffine(x, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return out.reshape(x.shape)


def _motion_kernel(radius: float, sigma: float, angle_deg: float) -> np.ndarray:
    """ImageMagick's motion blur as a correlation kernel: Gaussian weights exp(-i²/2σ²) at distance
    i = 0 .. 2·ceil(radius) pixels along ``angle``, each splatted bilinearly onto the pixel grid."""
    width = 2 * math.ceil(radius) + 1
    i = np.arange(width, dtype=np.float64)
    weights = np.exp(-(i**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    theta = math.radians(angle_deg)
    half = width
    kernel = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.float64)
    for w, d in zip(weights, i):
        x, y = half + d * math.cos(theta), half + d * math.sin(theta)
        x0, y0 = math.floor(x), math.floor(y)
        fx, fy = x - x0, y - y0
        kernel[y0, x0] += w * (1 - fx) * (1 - fy)
        kernel[y0, x0 + 1] += w * fx * (1 - fy)
        kernel[y0 + 1, x0] += w * (1 - fx) * fy
        kernel[y0 + 1, x0 + 1] += w * fx * fy
    return kernel.astype(np.float32)


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angle_deg: float) -> np.ndarray:
    kernel = _motion_kernel(radius, sigma, angle_deg)
    out = cv2.filter2D(x, -1, kernel, borderType=cv2.BORDER_REPLICATE)
    return out.reshape(x.shape)


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """A disk of ``radius`` pixels, anti-aliased by area coverage (so sub-pixel radii still matter), then
    softened by a Gaussian of ``alias_blur`` as in ImageNet-C."""
    half = math.ceil(radius + 0.5) + 2
    sub = 8  # supersampling per pixel side
    t = (np.arange(-half * sub, (half + 1) * sub) + 0.5) / sub - 0.5
    yy, xx = np.meshgrid(t, t, indexing="ij")
    inside = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    n = 2 * half + 1
    kernel = inside.reshape(n, sub, n, sub).mean(axis=(1, 3))
    if alias_blur > 0:
        kernel = cv2.GaussianBlur(kernel, (5, 5), alias_blur)
    return kernel / kernel.sum()


def _plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map on a ``size`` x ``size`` torus (size a power of two), in [0, 1].

    As in ImageNet-C the random displacement at each level is ``wibble * U(-wibble, wibble)`` with
    ``wibble`` divided by ``decay`` per level: its constants were tuned with that amplitude."""
    m = np.zeros((size, size), dtype=np.float64)
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        # square step: each square's centre = mean of its four corners + noise
        corners = m[0:size:step, 0:size:step]
        s = corners + np.roll(corners, -1, axis=0)
        s = s + np.roll(s, -1, axis=1)
        m[half:size:step, half:size:step] = s / 4 + wibble * rng.uniform(-wibble, wibble, s.shape)
        # diamond step: each edge midpoint = mean of its two corners and two neighbouring centres + noise
        centres = m[half:size:step, half:size:step]
        corners = m[0:size:step, 0:size:step]
        top = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        m[0:size:step, half:size:step] = top / 4 + wibble * rng.uniform(-wibble, wibble, top.shape)
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        m[half:size:step, 0:size:step] = left / 4 + wibble * rng.uniform(-wibble, wibble, left.shape)
        step //= 2
        wibble /= decay
    m -= m.min()
    return m / max(m.max(), 1e-12)


@lru_cache(maxsize=64)
def _noise_gain(sigma: float, truncate: float = 4.0) -> float:
    """Standard deviation of 2-D white noise (std 1) after ``_blur`` with ``sigma``: the kernel is separable,
    so sqrt(sum of its squares) is the sum of the squares of the 1-D kernel."""
    if sigma <= 0:
        return 1.0
    n = 2 * int(truncate * sigma + 0.5) + 1
    impulse = np.zeros(n)
    impulse[n // 2] = 1.0
    return float((gaussian_filter1d(impulse, sigma, mode="constant", truncate=truncate) ** 2).sum())


def _stochastic_round(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.floor(v + rng.random(v.shape)).astype(np.int64)


def _local_shuffle(x: np.ndarray, max_delta: float, rng: np.random.Generator) -> np.ndarray:
    """Every pixel swaps once with a random neighbour at most ``max_delta`` pixels away per axis.

    Offsets are U(-max_delta, max_delta) stochastically rounded, so a fractional distance (small images)
    still moves some pixels. Pixels whose row and column are equal modulo 2·reach+1 never share a swap
    partner, so each such phase is one vectorised swap."""
    h, w = x.shape[:2]
    reach = max(1, math.ceil(max_delta))
    dy = np.clip(_stochastic_round(rng.uniform(-max_delta, max_delta, (h, w)), rng), -reach, reach)
    dx = np.clip(_stochastic_round(rng.uniform(-max_delta, max_delta, (h, w)), rng), -reach, reach)
    period = 2 * reach + 1
    for py in range(period):
        for px in range(period):
            ys, xs = np.meshgrid(np.arange(py, h, period), np.arange(px, w, period), indexing="ij")
            ty = np.clip(ys + dy[ys, xs], 0, h - 1)
            tx = np.clip(xs + dx[ys, xs], 0, w - 1)
            a = x[ys, xs].copy()
            x[ys, xs] = x[ty, tx]
            x[ty, tx] = a
    return x


# --------------------------------------------------------------------------------------------------
# corruptions: fn(x float32 (H, W, C) in [0, 1], severity, rng, k) -> float array, clipped by ``corrupt``
# ``k`` is length_scale(short side); constant tables are copied from make_imagenet_c.py.


def gaussian_noise(x, severity, rng, k):
    c = [0.08, 0.12, 0.18, 0.26, 0.38][severity - 1]
    return x + rng.normal(size=x.shape) * c


def shot_noise(x, severity, rng, k):
    c = [60, 25, 12, 5, 3][severity - 1]
    return rng.poisson(x * c) / c


def impulse_noise(x, severity, rng, k):
    c = [0.03, 0.06, 0.09, 0.17, 0.27][severity - 1]
    # salt & pepper on a fraction c of the values (per channel), half salt, half pepper
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    return np.where(hit, salt.astype(np.float32), x)


def speckle_noise(x, severity, rng, k):
    c = [0.15, 0.2, 0.35, 0.45, 0.6][severity - 1]
    return x + x * rng.normal(size=x.shape) * c


def gaussian_blur(x, severity, rng, k):
    c = [1, 2, 3, 4, 6][severity - 1]
    return _blur(x, c * k)


def glass_blur(x, severity, rng, k):
    sigma, max_delta, iterations = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)][severity - 1]
    k = max(k, 1.0)  # a pixel-level texture: its severity trade-offs only hold at the published pixel sizes
    y = np.floor(np.clip(_blur(x, sigma * k), 0, 1) * 255) / 255  # the reference quantises to uint8 here
    for _ in range(iterations):
        y = _local_shuffle(y, max_delta * k, rng)
    return _blur(y, sigma * k)


def defocus_blur(x, severity, rng, k):
    radius, alias = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)][severity - 1]
    kernel = _disk_kernel(radius * k, alias * k)
    return cv2.filter2D(x, -1, kernel, borderType=cv2.BORDER_REFLECT_101).reshape(x.shape)


def motion_blur(x, severity, rng, k):
    radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][severity - 1]
    return _motion_blur(x, radius * k, sigma * k, rng.uniform(-45, 45))


def zoom_blur(x, severity, rng, k):
    factors = [
        np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
        np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03),
    ][severity - 1]
    out = x.copy()
    for f in factors:
        out += _zoom_about_centre(x, float(f))
    return out / (len(factors) + 1)


def snow(x, severity, rng, k):
    loc, scale, zoom, threshold, m_radius, m_sigma, keep = [
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ][severity - 1]
    h, w = x.shape[:2]
    flakes = rng.normal(loc, scale, (h, w)).astype(np.float32)
    flakes = _zoom_about_centre(flakes, zoom * max(k, 1.0))  # flake grain: pixel-level, not shrunk
    flakes[flakes < threshold] = 0
    flakes = _motion_blur(np.clip(flakes, 0, 1), m_radius * k, m_sigma * k, rng.uniform(-135, -45))
    flakes = (np.rint(flakes * 255) / 255)[..., None]  # the reference round-trips the layer through PNG
    x = keep * x + (1 - keep) * np.maximum(x, _grey(x) * 1.5 + 0.5)
    return x + flakes + np.rot90(flakes, k=2)


def frost(x, severity, rng, k):
    keep, amount = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)][severity - 1]
    h, w, channels = x.shape
    photos = _frost_photo_files()
    if photos:  # ImageNet-C: a random crop of one of its frost photographs
        bank = _frost_photos(photos, _frost_photo_scale(min(h, w)), h, w)
        texture = bank[rng.integers(_FROST_PHOTOS_USED)]
    else:
        bank = _frost_bank(h, w, round(k, 4))
        texture = bank[rng.integers(len(bank))]
    top = rng.integers(texture.shape[0] - h + 1)
    left = rng.integers(texture.shape[1] - w + 1)
    texture = texture[top : top + h, left : left + w]
    if channels == 1:
        texture = _grey(texture)
    return keep * x + amount * texture


def fog(x, severity, rng, k):
    amount, decay = [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)][severity - 1]
    h, w = x.shape[:2]
    size = 1 << (max(h, w) - 1).bit_length()
    peak = x.max()
    x = x + amount * _plasma_fractal(size, decay, rng)[:h, :w, None].astype(np.float32)
    return x * peak / (peak + amount)


def brightness(x, severity, rng, k):
    c = [0.1, 0.2, 0.3, 0.4, 0.5][severity - 1]
    if x.shape[2] == 1:
        return x + c
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def contrast(x, severity, rng, k):
    c = [0.4, 0.3, 0.2, 0.1, 0.05][severity - 1]
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * c + means


def saturate(x, severity, rng, k):
    scale, shift = [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)][severity - 1]
    if x.shape[2] == 1:
        return x
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = np.clip(hsv[..., 1] * scale + shift, 0, 1)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def elastic_transform(x, severity, rng, k):
    # (alpha, sigma, affine jitter) in pixels of a 224-px image; the reference writes them as 244 * fraction
    alpha, sigma, jitter = [
        (244 * 2, 244 * 0.7, 244 * 0.1),
        (244 * 2, 244 * 0.08, 244 * 0.2),
        (244 * 0.05, 244 * 0.01, 244 * 0.02),
        (244 * 0.07, 244 * 0.01, 244 * 0.02),
        (244 * 0.12, 244 * 0.01, 244 * 0.02),
    ][severity - 1]
    # The displacement field is alpha * (Gaussian(sigma) * U(-1, 1)). Smoothing white noise over fewer
    # pixels averages less, so alpha is corrected by the ratio of noise gains: the displacement (a length)
    # then scales with k like the other lengths.
    alpha = alpha * k * _noise_gain(sigma, 3.0) / _noise_gain(sigma * k, 3.0)
    sigma, jitter = sigma * k, jitter * k
    h, w = x.shape[:2]
    centre = np.float32([w // 2, h // 2])
    half = min(h, w) // 3
    src = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    dst = (src + rng.uniform(-jitter, jitter, src.shape)).astype(np.float32)
    warped = cv2.warpAffine(x, cv2.getAffineTransform(src, dst), (w, h), borderMode=cv2.BORDER_REFLECT_101)
    warped = warped.reshape(x.shape)
    dx = _blur(rng.uniform(-1, 1, (h, w)), sigma, truncate=3, mode="reflect") * alpha
    dy = _blur(rng.uniform(-1, 1, (h, w)), sigma, truncate=3, mode="reflect") * alpha
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = cv2.remap(warped, gx + dx.astype(np.float32), gy + dy.astype(np.float32), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REFLECT_101)
    return out.reshape(x.shape)


def pixelate(x, severity, rng, k):
    c = [0.6, 0.5, 0.4, 0.3, 0.25][severity - 1]
    img = _to_pil(x)
    w, h = img.size
    small = img.resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
    return _from_pil(small.resize((w, h), Image.BOX))


def jpeg_compression(x, severity, rng, k):
    quality = [25, 18, 15, 10, 7][severity - 1]
    buf = io.BytesIO()
    _to_pil(x).save(buf, format="JPEG", quality=quality)
    return _from_pil(Image.open(io.BytesIO(buf.getvalue())))


def spatter(x, severity, rng, k):
    h, w, channels = x.shape
    if k < 1:
        # Drops are drawn with the published constants on a canvas of h/k px (lengths then come out
        # scaled by k) and resized: their edge detection and 3x3 filters only work at that resolution.
        mask, mud = _spatter_mask(round(h / k), round(w / k), severity, rng, 1.0)
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_AREA)
    else:
        mask, mud = _spatter_mask(h, w, severity, rng, k)
    mask = mask[..., None]
    if mud:  # opaque brown blobs
        return x * (1 - mask) + mask * _colour((63, 42, 20), channels)
    return x + mask * _colour((175, 238, 238), channels)  # water: pale turquoise, shaded


def _spatter_mask(h: int, w: int, severity: int, rng: np.random.Generator, k: float) -> tuple[np.ndarray, bool]:
    loc, scale, blob_sigma, threshold, strength, mud = [
        (0.65, 0.3, 4, 0.69, 0.6, 0),
        (0.65, 0.3, 3, 0.68, 0.6, 0),
        (0.65, 0.3, 2, 0.68, 0.5, 0),
        (0.65, 0.3, 1, 0.65, 1.5, 1),
        (0.67, 0.4, 1, 0.65, 1.5, 1),
    ][severity - 1]
    liquid = _blur(rng.normal(loc, scale, (h, w)), blob_sigma * k)
    liquid[liquid < threshold] = 0
    if mud:
        m = _blur((liquid > threshold).astype(np.float32), strength * k)
        m[m < 0.8] = 0
        return m.astype(np.float32), True
    # water: drops shaded by an embossed, equalised distance-to-edge map, scaled to ``strength`` at the peak
    l8 = np.clip(liquid * 255, 0, 255).astype(np.uint8)
    dist = cv2.distanceTransform(255 - cv2.Canny(l8, 50, 150), cv2.DIST_L2, 5)
    dist = np.minimum(dist, 20 * k)
    dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
    emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float32)
    dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, emboss), (3, 3)).astype(np.float32)
    m = liquid * dist
    return (m / m.max() * strength if m.max() > 0 else m).astype(np.float32), False


# --------------------------------------------------------------------------------------------------
# frost: ImageNet-C's photographs when available, else a generated texture

_FROST_PHOTO_NAMES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
_FROST_PHOTOS_USED = 5  # make_imagenet_c.py draws np.random.randint(5): frost6.jpg is listed but never used


@lru_cache(maxsize=1)
def _frost_photo_files() -> tuple[Path, ...]:
    """The frost photographs shipped in the ``imagecorruptions`` wheel, or () when it is not installed.
    Found through the installed distribution's file list: none of the package's code is imported."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("imagecorruptions")
    except PackageNotFoundError:
        return ()
    found = {Path(str(f)).name: Path(str(dist.locate_file(f))) for f in dist.files or () if "frost" in str(f)}
    paths = tuple(found.get(name) for name in _FROST_PHOTO_NAMES)
    return paths if all(p is not None and p.is_file() for p in paths) else ()


def frost_source() -> str:
    """What ``frost`` blends in: ``"imagenet-c"`` (the photographs) or ``"generated"`` (the fallback texture)."""
    return "imagenet-c" if _frost_photo_files() else "generated"


def _frost_photo_scale(size: int) -> float:
    """How much the photographs are resized for an image whose short side is ``size``: not at all at
    224 px (ImageNet-C), proportionally above, ``max(size / 224, 0.2)`` below — 0.29 at 64 px and 0.2 at
    32 px, the factors Hendrycks used for Tiny-ImageNet-C (0.3) and CIFAR-10-C (0.2)."""
    return max(size / 224.0, 0.2)


@lru_cache(maxsize=16)
def _frost_photos(paths: tuple[Path, ...], scale: float, height: int, width: int) -> tuple[np.ndarray, ...]:
    """The photographs as RGB float32 in [0, 1], resized by ``scale`` (cv2.resize's bilinear default, as
    ImageNet-C's variants do) and, where that is still smaller than the image, up to cover it."""
    out = []
    for path in paths[:_FROST_PHOTOS_USED]:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise OSError(f"{path}: unreadable frost photograph (reinstall imagecorruptions)")
        f = max(scale, height / bgr.shape[0], width / bgr.shape[1])
        if f != 1.0:
            bgr = cv2.resize(bgr, (max(width, round(bgr.shape[1] * f)), max(height, round(bgr.shape[0] * f))))
        out.append(np.ascontiguousarray(bgr[..., ::-1], dtype=np.float32) / 255.0)
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# generated frost texture (the fallback)


@lru_cache(maxsize=16)
def _frost_bank(height: int, width: int, k: float, count: int = 5) -> tuple[np.ndarray, ...]:
    """A fixed bank of frost textures (the reference crops one of its 5-6 frost photos at random)."""
    h, w = math.ceil(1.3 * height) + 2, math.ceil(1.3 * width) + 2
    return tuple(_frost_texture(h, w, k, np.random.default_rng(2019 + i)) for i in range(count))


def _frost_texture(height: int, width: int, k: float, rng: np.random.Generator) -> np.ndarray:
    """Ice on a window, made up: (H, W, 3) float in [0, 1].

    Three layers: a patchy haze (fractal noise) where the glass is fogged; rime, a granular white
    speckle that gathers where the haze is thick; and fern-like dendrites, needles whose side branches
    leave at ±60° (the hexagonal habit of ice) and branch again, seeded mostly in the hazy patches.
    Lengths are in pixels of a 224-px image times ``k``. Tinted blue-white; mean brightness about 0.5,
    like the frost photographs the reference blends in."""
    size = 1 << (max(height, width) - 1).bit_length()
    haze = _plasma_fractal(size, 1.6, rng)[:height, :width].astype(np.float32)
    grain = cv2.GaussianBlur(rng.random((height, width)).astype(np.float32), (0, 0), max(0.4, 0.7 * k))
    grain = (grain - grain.mean()) / (grain.std() + 1e-6)
    rime = np.clip(grain * 0.5 + 2.2 * haze - 1.3, 0, 1)

    crystals = np.zeros((height, width), dtype=np.float32)
    shift = 4  # cv2 draws with 1/16-pixel precision and anti-aliasing
    scale = 2**shift

    def needle(x: float, y: float, angle: float, length: float, depth: int, value: float) -> None:
        x1, y1 = x + length * math.cos(angle), y + length * math.sin(angle)
        cv2.line(crystals, (int(x * scale), int(y * scale)), (int(x1 * scale), int(y1 * scale)),
                 value, 1, cv2.LINE_AA, shift)
        if depth == 2 or length < 2.0:
            return
        spacing = max(1.5, 3.0 * k)
        for i, t in enumerate(np.arange(spacing, length, spacing) / length):
            side = math.pi / 3 * (1 if i % 2 == 0 else -1)
            branch = length * (1 - t) * rng.uniform(0.25, 0.45)
            needle(x + t * (x1 - x), y + t * (y1 - y), angle + side, branch, depth + 1, value * 0.85)

    # seeds favour the hazy patches, as frost grows where the glass is coldest and wettest
    n_seeds = max(8, int(height * width / (16 * k) ** 2))
    weights = (haze.ravel() + 0.05) / (haze.sum() + 0.05 * haze.size)
    for idx in rng.choice(haze.size, size=n_seeds, p=weights):
        y0, x0 = divmod(int(idx), width)
        needle(x0 + rng.random(), y0 + rng.random(), rng.uniform(0, 2 * math.pi),
               rng.uniform(14, 40) * k, 0, float(rng.uniform(0.6, 1.0)))
    crystals = cv2.GaussianBlur(np.minimum(crystals, 1.0), (0, 0), max(0.35, 0.5 * k))

    value = 0.25 + 0.3 * haze + 0.35 * rime + 0.6 * crystals
    value = np.clip(value, 0, 1)
    tint = np.array([0.88, 0.94, 1.0], dtype=np.float32)
    return value[..., None] * tint


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator, float], np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "spatter": spatter,
    "saturate": saturate,
}
