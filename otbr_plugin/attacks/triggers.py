"""Backdoor triggers as pure tensor functions on uint8 batches (N, C, H, W).

Every function takes uint8 images and returns new uint8 images of the same shape (the input is never
modified); they work for 1 and 3 channels and any image size, on any device. Float arithmetic is done in
float32 on the 0..255 scale and rounded half-to-even (``torch.round``) and clamped back to uint8.

The triggers follow the original papers with BackdoorBench's default settings:

* BadNets (Gu et al. 2017): a white ``3 x 3`` square flush in the bottom-right corner at 32x32
  (BackdoorBench's ``generate_square.py --square_size 3 --distance_to_right 0 --distance_to_bottom 0``);
  the side is scaled with the image (``round(3 * H / 32)``, at least 1).
* Blended (Chen et al. 2017): ``x' = (1 - alpha) x + alpha t`` with a fixed trigger image ``t``: a uniform
  random-noise pattern generated from a seed, or an image file.
* SIG (Barni et al. 2019): ``x' = clip(x + v)``, ``v(i, j) = delta sin(2 pi j f / W)`` (a horizontal
  sinusoid: it varies along the columns ``j`` and is constant down each column).
* WaNet (Nguyen & Tran 2021): ``x' = grid_sample(x, clip((I + s P / H) * rescale, -1, 1))`` with the identity
  grid ``I`` and a smooth field ``P`` (``k x k`` uniform noise in [-1, 1], normalised by its mean absolute
  value, bicubically upsampled); the noise mode adds per-sample random offsets in ``[-1, 1] / H``.

Learned triggers (their search lives in the attack modules; applying them is here):

* LF (Zeng et al. 2021): ``x' = clip(x + 255 * delta)`` with ``delta`` a float (C, H, W) perturbation on the
  [0, 1] scale whose 2-d DFT is zero outside the low-frequency window ``|f_y|, |f_x| <= max_frequency``
  (:func:`lowpass`), scaled into the L-inf ball of radius ``epsilon`` (:func:`scale_into_linf`).
* TrojanNN (Liu et al. 2018): ``x' = x (1 - m) + 255 * p m`` with a binary mask ``m`` (H, W) and a pattern
  ``p`` (C, H, W) in [0, 1] (:func:`stamp`).
* InputAware (Nguyen & Tran 2020): ``x' = x + (g(x) - x) * m(x)`` with a per-image pattern ``g(x)`` and
  soft mask ``m(x)`` in [0, 1] from two generators (:func:`mix`, on float images in [0, 1]); the
  generators are trained with :func:`diversity_loss` and :func:`mask_norm_loss`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "check_images",
    "to_uint8",
    "scaled_patch_size",
    "patch_mask",
    "apply_patch",
    "noise_pattern",
    "load_trigger_image",
    "blend",
    "sig_signal",
    "apply_sig",
    "wanet_noise_grid",
    "identity_grid",
    "wanet_grid",
    "cross_grids",
    "warp",
    "frequency_window",
    "lowpass",
    "scale_into_linf",
    "apply_additive",
    "stamp",
    "mix",
    "soft_threshold",
    "diversity_loss",
    "mask_norm_loss",
]

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")


def check_images(images: torch.Tensor, what: str = "images") -> None:
    """Raise ``ValueError`` unless ``images`` is a uint8 batch (N, C, H, W) with 1 or 3 channels."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"{what} must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{what} must have 1 or 3 channels, got {images.shape[1]}")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Round half-to-even and clamp a float tensor on the 0..255 scale to uint8."""
    return torch.round(x).clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# BadNets
# ----------------------------------------------------------------------------------------------------------
def scaled_patch_size(image_size: int, size_at_32: int = 3) -> int:
    """Patch side for an image of ``image_size``: ``size_at_32`` at 32 pixels, scaled linearly, at least 1."""
    return max(1, int(round(size_at_32 * image_size / 32)))


def patch_mask(height: int, width: int, size: int, corner: str = "bottom_right", margin: int = 0) -> torch.Tensor:
    """Boolean (H, W) mask of a ``size x size`` square ``margin`` pixels from the given corner."""
    if corner not in CORNERS:
        raise ValueError(f"corner must be one of {', '.join(CORNERS)}, got {corner!r}")
    if size < 1 or margin < 0 or size + margin > min(height, width):
        raise ValueError(f"a {size}x{size} patch {margin} px from the corner does not fit a {height}x{width} image")
    mask = torch.zeros(height, width, dtype=torch.bool)
    top = height - margin - size if corner.startswith("bottom") else margin
    left = width - margin - size if corner.endswith("right") else margin
    mask[top : top + size, left : left + size] = True
    return mask


def apply_patch(images: torch.Tensor, size: int, value: int = 255, corner: str = "bottom_right",
                margin: int = 0) -> torch.Tensor:
    """BadNets: set a ``size x size`` square (all channels) to ``value``; other pixels are unchanged."""
    check_images(images)
    if not 0 <= value <= 255:
        raise ValueError(f"patch value must be in 0..255, got {value}")
    mask = patch_mask(images.shape[2], images.shape[3], size, corner, margin).to(images.device)
    out = images.clone()
    out[:, :, mask] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# Blended
# ----------------------------------------------------------------------------------------------------------
def noise_pattern(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """A deterministic uniform random-noise trigger image, uint8 (C, H, W), from ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 256, tuple(shape), generator=gen, dtype=torch.int64).to(torch.uint8)


def load_trigger_image(path: str | Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """Read an image file as a uint8 (C, H, W) trigger: grey ('L') for 1 channel, RGB for 3, resized
    bilinearly to H x W."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"trigger image {p} does not exist")
    c, h, w = shape
    try:
        with Image.open(p) as img:
            img = img.convert("L" if c == 1 else "RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.BILINEAR)
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"trigger image {p}: cannot decode ({err})") from err
    return data.view(h, w, c).permute(2, 0, 1).contiguous()


def blend(images: torch.Tensor, pattern: torch.Tensor, alpha: float) -> torch.Tensor:
    """Blended: ``round((1 - alpha) * x + alpha * pattern)``; ``pattern`` is uint8 (C, H, W) matching x."""
    check_images(images)
    if pattern.dtype != torch.uint8 or tuple(pattern.shape) != tuple(images.shape[1:]):
        raise ValueError(f"blend pattern must be uint8 of shape {tuple(images.shape[1:])}, got "
                         f"{pattern.dtype} {tuple(pattern.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    x = images.float()
    t = pattern.to(images.device).float().unsqueeze(0)
    return to_uint8((1.0 - alpha) * x + alpha * t)


# ----------------------------------------------------------------------------------------------------------
# SIG
# ----------------------------------------------------------------------------------------------------------
def sig_signal(width: int, delta: float, frequency: float) -> torch.Tensor:
    """The SIG signal along the columns, float32 (W,): ``delta * sin(2 pi j f / W)`` on the 0..255 scale."""
    j = torch.arange(width, dtype=torch.float64)
    return (delta * torch.sin(2 * math.pi * j * frequency / width)).float()


def apply_sig(images: torch.Tensor, delta: float, frequency: float) -> torch.Tensor:
    """SIG: add the horizontal sinusoid to every row and channel, then clamp to 0..255."""
    check_images(images)
    v = sig_signal(images.shape[3], delta, frequency).to(images.device)
    return to_uint8(images.float() + v.view(1, 1, 1, -1))


# ----------------------------------------------------------------------------------------------------------
# WaNet
# ----------------------------------------------------------------------------------------------------------
def wanet_noise_grid(k: int, height: int, width: int, seed: int) -> torch.Tensor:
    """The smooth random field P, float32 (1, H, W, 2): a ``k x k x 2`` uniform [-1, 1] noise from ``seed``,
    divided by its mean absolute value and upsampled bicubically (align_corners) to H x W."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    gen = torch.Generator().manual_seed(int(seed))
    ins = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
    ins = ins / ins.abs().mean()
    field = F.interpolate(ins, size=(height, width), mode="bicubic", align_corners=True)
    return field.permute(0, 2, 3, 1).contiguous()


def identity_grid(height: int, width: int) -> torch.Tensor:
    """The grid_sample identity, float32 (1, H, W, 2) with (x, y) in [-1, 1] (align_corners=True)."""
    ys = torch.linspace(-1, 1, height)
    xs = torch.linspace(-1, 1, width)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=2).unsqueeze(0)


def wanet_grid(noise_grid: torch.Tensor, s: float, grid_rescale: float = 1.0) -> torch.Tensor:
    """The backdoor warping grid ``clip((I + s * P / H) * grid_rescale, -1, 1)``, float32 (1, H, W, 2)."""
    _, h, w, _ = noise_grid.shape
    grid = (identity_grid(h, w) + s * noise_grid / h) * grid_rescale
    return grid.clamp(-1, 1)


def cross_grids(grid: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Noise-mode grids for ``n`` samples: the backdoor grid plus per-sample uniform offsets in
    ``[-1, 1] / H``, clipped to [-1, 1]; float32 (n, H, W, 2), deterministic for ``seed``."""
    _, h, w, _ = grid.shape
    gen = torch.Generator().manual_seed(int(seed))
    offsets = torch.rand(n, h, w, 2, generator=gen) * 2 - 1
    return (grid + offsets / h).clamp(-1, 1)


def warp(images: torch.Tensor, grid: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Warp uint8 images with ``grid`` ((1 or N), H, W, 2) by bilinear ``grid_sample`` (align_corners,
    zero padding), rounded back to uint8."""
    check_images(images)
    n, _, h, w = images.shape
    if grid.dim() != 4 or grid.shape[1:] != (h, w, 2) or grid.shape[0] not in (1, n):
        raise ValueError(f"grid must be (1 or {n}, {h}, {w}, 2), got {tuple(grid.shape)}")
    grid = grid.to(images.device, torch.float32)
    out = torch.empty_like(images)
    for start in range(0, n, batch_size):
        x = images[start : start + batch_size].float()
        g = grid if grid.shape[0] == 1 else grid[start : start + batch_size]
        g = g.expand(x.shape[0], -1, -1, -1)
        out[start : start + batch_size] = to_uint8(F.grid_sample(x, g, mode="bilinear", padding_mode="zeros",
                                                                 align_corners=True))
    return out


# ----------------------------------------------------------------------------------------------------------
# LF: low-frequency additive perturbation
# ----------------------------------------------------------------------------------------------------------
def frequency_window(height: int, width: int, max_frequency: int) -> torch.Tensor:
    """Boolean (H, W) mask over the (unshifted) 2-d DFT: True where ``|f_y| <= max_frequency`` and
    ``|f_x| <= max_frequency`` (f in cycles per image, signed as ``torch.fft.fftfreq``). The window is symmetric,
    so a real signal filtered with it stays real."""
    if isinstance(max_frequency, bool) or not isinstance(max_frequency, int) or max_frequency < 0:
        raise ValueError(f"max_frequency must be a non-negative integer, got {max_frequency!r}")
    if 2 * max_frequency >= min(height, width):
        raise ValueError(f"max_frequency {max_frequency} must be below half the image size "
                         f"({min(height, width)} px); it would keep every frequency")
    fy = (torch.fft.fftfreq(height) * height).round().abs()
    fx = (torch.fft.fftfreq(width) * width).round().abs()
    return (fy[:, None] <= max_frequency) & (fx[None, :] <= max_frequency)


def lowpass(signal: torch.Tensor, max_frequency: int) -> torch.Tensor:
    """Ideal low-pass filter over the last two dimensions: zero every DFT coefficient outside
    :func:`frequency_window` and transform back (real part; float32, on the input's device; not differentiable)."""
    if signal.dim() < 2:
        raise ValueError(f"lowpass needs (..., H, W), got shape {tuple(signal.shape)}")
    h, w = signal.shape[-2:]
    window = frequency_window(h, w, max_frequency)
    spectrum = torch.fft.fft2(signal.detach().cpu().double())  # float64 on the CPU: exact and device-independent
    return torch.fft.ifft2(spectrum * window).real.float().to(signal.device)


def scale_into_linf(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``delta`` scaled down (never up) so that ``max |delta| <= epsilon``. Scaling, unlike clipping, keeps a
    band-limited perturbation band-limited."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    peak = float(delta.abs().max()) if delta.numel() else 0.0
    return delta * (epsilon / peak) if peak > epsilon else delta.clone()


def apply_additive(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``clip(round(x + 255 * delta))``: add a float (C, H, W) perturbation on the [0, 1] scale to uint8 images."""
    check_images(images)
    if delta.dim() != 3 or tuple(delta.shape) != tuple(images.shape[1:]):
        raise ValueError(f"perturbation must have shape {tuple(images.shape[1:])} (C, H, W), got {tuple(delta.shape)}")
    return to_uint8(images.float() + 255.0 * delta.to(images.device, torch.float32).unsqueeze(0))


# ----------------------------------------------------------------------------------------------------------
# TrojanNN: a pattern stamped into a mask region
# ----------------------------------------------------------------------------------------------------------
def stamp(images: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace the pixels under the boolean (H, W) ``mask`` by ``round(255 * pattern)`` (pattern float (C, H, W)
    in [0, 1]); pixels outside the mask are unchanged."""
    check_images(images)
    c, h, w = images.shape[1:]
    if mask.dtype != torch.bool or tuple(mask.shape) != (h, w):
        raise ValueError(f"mask must be a boolean ({h}, {w}) tensor, got {mask.dtype} {tuple(mask.shape)}")
    if pattern.dim() != 3 or tuple(pattern.shape) != (c, h, w):
        raise ValueError(f"pattern must have shape ({c}, {h}, {w}), got {tuple(pattern.shape)}")
    if pattern.numel() and (float(pattern.min()) < 0 or float(pattern.max()) > 1):
        raise ValueError("pattern values must lie in [0, 1]")
    values = to_uint8(255.0 * pattern.to(images.device, torch.float32))
    out = images.clone()
    m = mask.to(images.device)
    out[:, :, m] = values[:, m].unsqueeze(0).expand(images.shape[0], -1, -1)
    return out


# ----------------------------------------------------------------------------------------------------------
# InputAware: generated pattern and mask
# ----------------------------------------------------------------------------------------------------------
def mix(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x + (pattern - x) * mask`` on float images in [0, 1] (differentiable; mask broadcasts over channels)."""
    return x + (pattern - x) * mask


def soft_threshold(raw: torch.Tensor) -> torch.Tensor:
    """The InputAware mask nonlinearity: ``(1 + tanh(20 raw - 10)) / 2``, nearly binary around raw = 0.5."""
    return 0.5 * (1.0 + torch.tanh(20.0 * raw - 10.0))


def _rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # the floor keeps the gradient finite where two outputs are equal (sqrt'(0) is infinite: saturated masks gave
    # NaN weights in InputAware's mask pre-training); it moves a distance by at most 1e-6
    return (a - b).pow(2).flatten(1).mean(1).add(1e-12).sqrt()


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor,
                   eps: float = 1e-7) -> torch.Tensor:
    """Mean over pairs of ``d(x1, x2) / (d(out1, out2) + eps)`` (d: per-sample root-mean-square distance):
    small when different inputs get different generator outputs (the paper's diversity loss)."""
    if x1.shape != x2.shape or out1.shape != out2.shape or x1.shape[0] != out1.shape[0]:
        raise ValueError("diversity_loss needs pairs of equal shape: inputs "
                         f"{tuple(x1.shape)}/{tuple(x2.shape)}, outputs {tuple(out1.shape)}/{tuple(out2.shape)}")
    return (_rms_distance(x1, x2) / (_rms_distance(out1, out2) + eps)).mean()


def mask_norm_loss(mask: torch.Tensor, density: float) -> torch.Tensor:
    """``mean(relu(mask - density))``: pushes mask values (and so the mask's area) below ``density``."""
    return F.relu(mask - density).mean()
