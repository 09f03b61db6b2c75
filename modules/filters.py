"""ControlNet filters: turn a batch of training images into the ControlNet input.

Every filter is a small class (docs/OFFICIAL.md, ControlNet filters):

* the constructor takes the official parameter names (the keys of ``controlnet_filter_params``);
* ``num_channels()`` is the ControlNet ``c_in``;
* ``__call__(images, generator=None, **kwargs)`` takes images ``(B, 3, H, W)`` in ``[0, 1]`` and
  ALWAYS returns a tuple ``(control, preview)``: ``control`` is the ControlNet input, ``preview`` a
  ``(B, 3, H, W)`` tensor in ``[0, 1]`` for preview grids.

All randomness comes from the ``generator`` argument (a ``torch.Generator``; ``None`` means torch's
global RNG), so a run seeded from (seed, rank, step) repeats exactly.

``resolve_filter(name_or_path, params)`` builds a filter from the YAML keys ``controlnet_filter`` /
``controlnet_filter_params``: a bare name from :data:`FILTERS`, or ``"package.module:ClassName"``
for a user filter (imported with importlib, never ``eval``).

Differences from the official filters (docs/OFFICIAL.md, ControlNet filters and Defects):

* ``InpaintFilter`` computes its masks with the released saliency network (``modules/saliency.py``)
  as the official filter does; the spectral-residual proxy remains as an explicit option
  (``saliency="spectral_residual"``); blur kernels shrink for images under 141 px, and it accepts
  both ``thresold`` (official spelling) and ``threshold``.
* ``SREffnetFilter`` uses the EfficientNet encoder the caller passes in (no hard-coded path).
* ``IdentityFilter`` takes a pluggable face model (``face_model=``, see :func:`load_face_model`) and
  its preview palette index uses the palette length (the official code indexed 12 colours with
  ``j % 13``).
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
import re
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from modules.effnet import imagenet_normalize

__all__ = [
    "FilterError",
    "MissingDependencyError",
    "CannyFilter",
    "InpaintFilter",
    "SREffnetFilter",
    "SRFilter",
    "IdentityFilter",
    "InsightFaceModel",
    "load_face_model",
    "resolve_filter",
    "FILTERS",
    "spectral_residual_saliency",
    "gaussian_blur_separable",
]

DeviceLike = Union[str, torch.device]


class FilterError(ValueError):
    """A filter was configured or called with invalid input."""


class MissingDependencyError(FilterError, ImportError):
    """An optional dependency of a filter (e.g. the face model) is not installed or not available."""


# --------------------------------------------------------------------------------------------------
# helpers


def _check_images(images: Any, who: str) -> torch.Tensor:
    """Validate the filter input contract: a float tensor (B, 3, H, W) with values in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise FilterError(f"{who}: images must be a torch.Tensor (B,3,H,W) in [0,1], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise FilterError(f"{who}: images must have shape (B,3,H,W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise FilterError(f"{who}: images must be a floating-point tensor in [0,1], got dtype {images.dtype}")
    if images.numel() == 0:
        raise FilterError(f"{who}: images is empty (shape {tuple(images.shape)})")
    # A small tolerance for resampling round-off; a [-1, 1] or [0, 255] batch is a caller bug that
    # would silently produce garbage control images, so it is refused.
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise FilterError(
            f"{who}: images must be in [0,1], got values in [{lo:.3g}, {hi:.3g}] "
            "(convert [-1,1] images with (x+1)/2, uint8 images with x/255)"
        )
    return images


def _check_generator(generator: Any, who: str) -> Optional[torch.Generator]:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise FilterError(f"{who}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _uniform(generator: Optional[torch.Generator], n: int = 1) -> torch.Tensor:
    """n uniform draws in [0,1) on the CPU, from ``generator`` (on its own device) or the global RNG."""
    if generator is None:
        return torch.rand(n)
    return torch.rand(n, generator=generator, device=generator.device).cpu()


def _check_probability(value: Any, name: str, who: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise FilterError(f"{who}: {name} must be a probability in [0,1], got {value!r}")
    return float(value)


def _check_scale_factor(value: Any, who: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise FilterError(f"{who}: scale_factor must be a number in (0, 1] (a downscale factor), got {value!r}")
    return float(value)


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [0,1] -> uint8 (B,H,W,3) RGB the way the official filters convert: ``(x*255)``
    truncated (not rounded). Clamped first so tiny negative round-off cannot wrap around to 255."""
    arr = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255.0
    return arr.astype(np.uint8)


def _gaussian_kernel1d(kernel_size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Same discretisation as torchvision's gaussian_blur (linspace over the kernel, normalised).
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, dtype=dtype, device=device)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def _default_sigma(kernel_size: int) -> float:
    """torchvision's default sigma for a kernel size (141 -> 21.5, the official inpainting blur)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def gaussian_blur_separable(x: torch.Tensor, kernel_size: int, sigma: Optional[float] = None) -> torch.Tensor:
    """Gaussian blur of (B,C,H,W) with reflect padding, equal to ``torchvision.transforms.functional.
    gaussian_blur(x, [k, k], [sigma, sigma])`` up to float round-off.

    torchvision convolves with the full 2-D kernel (k² taps per pixel: ~1.2e10 MACs for the official
    141-kernel on a 768² mask); the Gaussian is separable, so two 1-D passes give the same result
    with 2k taps, which keeps the inpainting filter cheap on CPU.
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise FilterError(f"gaussian blur kernel size must be a positive odd integer, got {kernel_size}")
    if kernel_size == 1:
        return x
    sigma = _default_sigma(kernel_size) if sigma is None else float(sigma)
    pad = kernel_size // 2
    if pad >= min(x.shape[-2:]):
        raise FilterError(
            f"gaussian blur kernel {kernel_size} is too large for a {x.shape[-2]}x{x.shape[-1]} image "
            "(reflect padding needs kernel//2 < image side)"
        )
    k = _gaussian_kernel1d(kernel_size, sigma, x.dtype, x.device)
    c = x.shape[1]
    y = F.pad(x, [pad, pad, pad, pad], mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)
    return y


def _reject_kwargs(kwargs: dict, who: str, accepted: Sequence[str]) -> None:
    """Unknown per-call keyword arguments are an error (a typo would otherwise be ignored silently)."""
    if kwargs:
        names = ", ".join(sorted(kwargs))
        known = ", ".join(accepted) if accepted else "none besides generator"
        raise FilterError(f"{who}: unknown call argument(s) {names}; accepted: {known}")


# --------------------------------------------------------------------------------------------------
# Canny


class CannyFilter:
    """Canny edge map (1 channel), as the official filter (docs/OFFICIAL.md, ControlNet filters).

    Steps: bilinear resize to ``resize``×``resize`` (``align_corners=False``, no antialias); per image
    OpenCV ``cv2.Canny`` on the uint8 HWC RGB image (``x*255`` truncated) with hysteresis thresholds
    ``low_threshold``/``high_threshold``, Sobel aperture ``aperture_size`` and the L1 gradient norm
    (``l2_gradient=False``); edges/255 as float; bilinear resize back to (H, W). The map is binary
    ({0,1}) at ``resize`` resolution; after the resize back it lies in [0,1] (soft edge borders).

    Params:
        device: where the output lives (OpenCV itself always runs on the CPU).
        resize: side of the square working resolution (official 224). ``None`` runs Canny at the
            native (H, W) and then the output is exactly binary.
        low_threshold, high_threshold: Canny hysteresis thresholds on the gradient magnitude
            (official 100 and 200).
        aperture_size: Sobel aperture, 3, 5 or 7 (official 3).
        l2_gradient: use the L2 gradient norm instead of L1 (official False).

    Returns ``(edges (B,1,H,W), edges repeated to 3 channels as the preview)``.
    """

    def __init__(
        self,
        device: DeviceLike = "cpu",
        resize: Optional[int] = 224,
        low_threshold: float = 100,
        high_threshold: float = 200,
        aperture_size: int = 3,
        l2_gradient: bool = False,
    ) -> None:
        if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 8):
            raise FilterError(f"CannyFilter: resize must be an integer >= 8 or null, got {resize!r}")
        for name, value in (("low_threshold", low_threshold), ("high_threshold", high_threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise FilterError(f"CannyFilter: {name} must be a non-negative number, got {value!r}")
        if aperture_size not in (3, 5, 7):
            raise FilterError(f"CannyFilter: aperture_size must be 3, 5 or 7 (OpenCV Sobel), got {aperture_size!r}")
        self.device = torch.device(device)
        self.resize = resize
        self.low_threshold = float(low_threshold)
        self.high_threshold = float(high_threshold)
        self.aperture_size = int(aperture_size)
        self.l2_gradient = bool(l2_gradient)

    def num_channels(self) -> int:
        return 1

    def edges_at_working_size(self, images: torch.Tensor) -> torch.Tensor:
        """The binary (values 0/1) edge maps at the working resolution, (B,1,r,r) on the CPU."""
        import cv2  # local import: only the Canny filter needs OpenCV

        x = images.detach().float().cpu()
        if self.resize is not None:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False, antialias=False)
        arr = _to_uint8_hwc(x)
        edges = [
            cv2.Canny(
                np.ascontiguousarray(a),
                self.low_threshold,
                self.high_threshold,
                apertureSize=self.aperture_size,
                L2gradient=self.l2_gradient,
            )
            for a in arr
        ]
        return torch.from_numpy(np.stack(edges)).float().div_(255.0).unsqueeze(1)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, generator: Optional[torch.Generator] = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Edge maps for ``images`` (B,3,H,W) in [0,1]; ``generator`` is unused (deterministic)."""
        _reject_kwargs(kwargs, "CannyFilter", ())
        images = _check_images(images, "CannyFilter")
        _check_generator(generator, "CannyFilter")
        h, w = images.shape[-2:]
        edges = self.edges_at_working_size(images)
        if edges.shape[-2:] != (h, w):
            edges = F.interpolate(edges, size=(h, w), mode="bilinear", align_corners=False)
        edges = edges.to(self.device)
        return edges, edges.expand(-1, 3, -1, -1).clone()


# --------------------------------------------------------------------------------------------------
# Inpainting / outpainting


def spectral_residual_saliency(images: torch.Tensor, side: int = 64, blur_fraction: float = 0.04) -> torch.Tensor:
    """Spectral-residual saliency (Hou & Zhang, CVPR 2007) of (B,3,H,W) images in [0,1].

    The luminance is area-downsampled so its shorter side is ``side`` pixels; the saliency is the
    squared magnitude of the inverse FFT of ``exp(log|A| - mean3x3(log|A|) + i*phase)``, smoothed with
    a Gaussian of sigma ``blur_fraction * side`` and min-max normalised per image to [0,1].
    Returns (B,1,h,w) at the downsampled size. A constant image gives all zeros.
    """
    b, _, h, w = images.shape
    scale = side / min(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    luma_w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    gray = (images.float() * luma_w).sum(1, keepdim=True)
    gray = F.interpolate(gray, size=size, mode="area")
    spec = torch.fft.fft2(gray)
    log_amp = torch.log(spec.abs() + 1e-8)
    # Local average of the log spectrum (replicate padding keeps the border average meaningful).
    avg = F.avg_pool2d(F.pad(log_amp, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    sal = torch.fft.ifft2(torch.exp(torch.complex(log_amp - avg, torch.angle(spec)))).abs().pow(2)
    sigma = max(0.5, blur_fraction * side)
    k = min(2 * int(math.ceil(2 * sigma)) + 1, 2 * (min(size) // 2) - 1)
    if k >= 3:
        sal = gaussian_blur_separable(sal, k, sigma)
    lo = sal.amin(dim=(-2, -1), keepdim=True)
    hi = sal.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    # A (nearly) flat image has no salient region, only FFT round-off: return zeros (not amplified
    # noise or NaN) and let the caller's coverage rule act. 1e-3 is a quarter of a uint8 level.
    flat = gray.flatten(1).std(dim=1, unbiased=False).view(b, 1, 1, 1) < 1e-3
    ok = (span > 1e-12) & ~flat
    return torch.where(ok, (sal - lo) / span.clamp_min(1e-12), torch.zeros_like(sal))


class InpaintFilter:
    """Inpainting / outpainting input (4 channels): the image with masked pixels set to 1.0 (white)
    followed by the mask as float, ``cat([masked_image, mask])``.

    Masks as the official filter computes them (docs/OFFICIAL.md, ControlNet filters), with
    ``saliency="model"`` (default):

    1. the released saliency network (:class:`modules.saliency.MicroResNet`, ``saliency_model``) on a
       copy of the batch resized to shorter side 240 (bilinear, antialias; torchvision's rule);
    2. ``mask = saliency > t`` with ``t ~ U(thresold[0], thresold[1])`` (one draw per call, like the
       official ``np.random.uniform``) unless ``threshold=`` is passed;
    3. with probability ``p_outpaint`` (one coin per call; or always/never when ``outpaint=True/False``
       is passed) the mask is inverted (outpainting: the border is regenerated);
    4. nearest resize to (H, W), Gaussian blur (kernel ``blur_kernel`` 141, sigma 21.5, torchvision's
       default for that kernel, reflect padding) and re-threshold ``> 0.5``. The 141 kernel is used
       unchanged when ``min(H, W) >= blur_kernel``; smaller images (tests, tiny configs, where
       torchvision's reflect padding would fail) use the odd kernel ``round(blur_kernel * min(H, W) /
       768)`` (at least 3) with torchvision's default sigma for it.

    Like the official masks these may be empty or cover the whole image. ``coverage=[lo, hi]``
    (off by default with the network) re-chooses the threshold, then draws a rectangle, when a mask
    covers a fraction outside the range.

    ``saliency="spectral_residual"`` selects, explicitly, the proxy used before the weights were
    found: a spectral-residual map (:func:`spectral_residual_saliency`) of the image itself, one
    threshold and coin **per image**, and the coverage rule on by default ([0.05, 0.95]). Its masks
    are object-shaped blobs too, but not the official ones.

    An explicit boolean ``mask=`` ((H,W), (B,H,W), (1|B,1,H,W); True = regenerate) is used as is: no
    inversion, blur or coverage rule.

    Params:
        device: where the output (and the saliency network) lives.
        thresold: [low, high] range of the saliency threshold (official spelling, default [0.04, 0.4]).
        threshold: the same, correctly spelled; give one of the two, not both.
        p_outpaint: probability of inverting the mask (default 0.4).
        saliency: ``"model"`` (the released network) or ``"spectral_residual"`` (the proxy).
        saliency_model: the network: a ``MicroResNet`` (or any module with its input/output
            contract), a path to its weights (loaded at the first call), or None: the training job
            sets it from ``saliency_model_path`` (:meth:`set_saliency_model`).
        coverage: [min, max] fraction of masked pixels to guarantee, or None (default: off with the
            network, [0.05, 0.95] with the proxy).
        blur_kernel: Gaussian kernel of the smoothing step at full resolution (odd, default 141).

    Call: ``filter(images, generator=None, mask=None, threshold=None, outpaint=None)`` ->
    ``(control (B,4,H,W), preview = masked image (B,3,H,W))``.
    """

    SALIENCY_SIDE = 64      # resolution of the spectral-residual analysis (as in Hou & Zhang)
    WORKING_SIDE = 240      # official saliency working size (shorter side)
    SALIENCY_MODES = ("model", "spectral_residual")
    REFERENCE_SIDE = 768    # official training resolution the 141 blur kernel was chosen for

    def __init__(
        self,
        device: DeviceLike = "cpu",
        thresold: Optional[Sequence[float]] = None,
        p_outpaint: float = 0.4,
        threshold: Optional[Sequence[float]] = None,
        coverage: Optional[Sequence[float]] = None,
        blur_kernel: int = 141,
        saliency: str = "model",
        saliency_model: Any = None,
    ) -> None:
        if thresold is not None and threshold is not None:
            raise FilterError(
                "InpaintFilter: give either 'thresold' (official spelling) or 'threshold', not both"
            )
        rng = threshold if threshold is not None else thresold
        if rng is None:
            rng = (0.04, 0.4)
        self.threshold = self._check_range(rng, "thresold/threshold", 0.0, 1.0, allow_equal=True)
        self.p_outpaint = _check_probability(p_outpaint, "p_outpaint", "InpaintFilter")
        if saliency not in self.SALIENCY_MODES:
            raise FilterError(f"InpaintFilter: saliency must be one of {list(self.SALIENCY_MODES)}, got {saliency!r}")
        self.saliency = saliency
        if coverage is None and saliency == "spectral_residual":
            coverage = (0.05, 0.95)
        self.coverage = None if coverage is None else self._check_range(coverage, "coverage", 0.0, 1.0, allow_equal=False)
        if saliency_model is not None and not isinstance(saliency_model, (str, os.PathLike, torch.nn.Module)):
            raise FilterError(f"InpaintFilter: saliency_model must be a module or a path to its weights, "
                              f"got {type(saliency_model).__name__}")
        self._saliency_model = saliency_model
        if isinstance(blur_kernel, bool) or not isinstance(blur_kernel, int) or blur_kernel < 1 or blur_kernel % 2 == 0:
            raise FilterError(f"InpaintFilter: blur_kernel must be a positive odd integer, got {blur_kernel!r}")
        self.blur_kernel = blur_kernel
        self.device = torch.device(device)

    @property
    def thresold(self) -> tuple[float, float]:  # official attribute name
        return self.threshold

    @staticmethod
    def _check_range(value: Any, name: str, lo: float, hi: float, allow_equal: bool) -> tuple[float, float]:
        ok = (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        )
        if ok:
            a, b = float(value[0]), float(value[1])
            ok = lo <= a <= hi and lo <= b <= hi and (a <= b if allow_equal else a < b)
        if not ok:
            raise FilterError(
                f"InpaintFilter: {name} must be a pair [low, high] with {lo} <= low "
                f"{'<=' if allow_equal else '<'} high <= {hi}, got {value!r}"
            )
        return float(value[0]), float(value[1])

    def num_channels(self) -> int:
        return 4

    def blur_params(self, h: int, w: int) -> tuple[int, float]:
        """(kernel, sigma) of the mask smoothing for an (h, w) image (see class docstring, step 4)."""
        side = min(h, w)
        if side >= self.blur_kernel:
            k = self.blur_kernel
        else:
            k = int(round(self.blur_kernel * side / self.REFERENCE_SIDE))
            k = max(3, k if k % 2 == 1 else k + 1)
            # reflect padding needs k//2 < side
            while k > 1 and k // 2 >= side:
                k -= 2
        return k, _default_sigma(k) if k > 1 else 1.0

    # -- mask pieces -------------------------------------------------------------------------------

    def _finish(self, work_mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Working-size boolean masks (N,1,h',w') -> final (N,1,H,W) boolean masks (resize, blur, >0.5)."""
        m = F.interpolate(work_mask.float(), size=(h, w), mode="nearest")
        k, sigma = self.blur_params(h, w)
        if k > 1:
            m = gaussian_blur_separable(m, k, sigma)
        return m > 0.5

    def _in_range(self, frac: float) -> bool:
        return self.coverage is None or self.coverage[0] <= frac <= self.coverage[1]

    # -- the saliency network ----------------------------------------------------------------------

    @property
    def needs_saliency_model(self) -> bool:
        """True while the network mode has no network yet (the job then calls :meth:`set_saliency_model`)."""
        return self.saliency == "model" and self._saliency_model is None

    def set_saliency_model(self, model: torch.nn.Module) -> None:
        """Use ``model`` (a loaded saliency network) for the masks."""
        self._saliency_model = model.to(self.device).eval().requires_grad_(False)

    def saliency_network(self) -> torch.nn.Module:
        """The saliency network (a path given at construction is loaded now)."""
        model = self._saliency_model
        if model is None:
            raise FilterError(
                "InpaintFilter: no saliency network: set config key 'saliency_model_path' (get the file with "
                "`bash models/download_models.sh saliency`), pass saliency_model=, or choose "
                "controlnet_filter_params: {saliency: spectral_residual} for the proxy masks"
            )
        if not isinstance(model, torch.nn.Module):
            from fileio.errors import CheckpointError
            from modules.saliency import load_saliency_model

            try:
                model = load_saliency_model(model, device=self.device)
            except CheckpointError as exc:
                raise FilterError(f"InpaintFilter: saliency_model: {exc}") from None
            self._saliency_model = model
        return model

    def saliency_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The network's saliency (B,1,h',w') of a copy of ``images`` with shorter side 240 (antialias)."""
        net = self.saliency_network()
        param = next(net.parameters(), None)
        h, w = images.shape[-2:]
        side = self.WORKING_SIDE
        size = (side, int(side * w / h)) if h <= w else (int(side * h / w), side)  # torchvision's rule
        x = images.float()
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        if param is not None:
            x = x.to(param.device, param.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):  # masks from fp32 saliency
            return net(x).float()

    def _model_mask(
        self, images: torch.Tensor, generator: Optional[torch.Generator], threshold: Optional[float],
        outpaint: Optional[bool],
    ) -> torch.Tensor:
        b, _, h, w = images.shape
        sal = self.saliency_maps(images)
        # Two draws always (threshold, outpaint coin), one per call as in the official filter, so the
        # stream does not depend on which call arguments were given.
        draws = _uniform(generator, 2)
        t = self.threshold[0] + (self.threshold[1] - self.threshold[0]) * draws[0].item() if threshold is None \
            else float(threshold)
        inv = bool(draws[1].item() < self.p_outpaint) if outpaint is None else bool(outpaint)
        m = sal > t
        if inv:
            m = ~m
        out = self._finish(m.to(images.device), h, w)
        if self.coverage is not None:
            for i in range(b):
                f = out[i].float().mean().item()
                if not self._in_range(f):
                    out[i] = self._fix_coverage(sal[i, 0].to(images.device), inv, f, h, w, generator)
        return out

    def _fix_coverage(
        self, sal: torch.Tensor, invert: bool, frac: float, h: int, w: int, generator: Optional[torch.Generator]
    ) -> torch.Tensor:
        """A final mask for one image whose drawn mask covered ``frac`` (outside the range)."""
        lo, hi = self.coverage
        bound = lo if frac < lo else hi
        flat = sal.flatten().sort().values
        n = flat.numel()
        # Re-choose the threshold from the saliency quantiles, aiming at coverages that move from
        # just inside the violated bound towards 50 %.
        mid = min(max(0.5, lo), hi)
        for step in (0.15, 0.4, 0.7, 1.0):
            target = bound + (mid - bound) * step
            p = 1.0 - target if invert else target          # wanted fraction of (saliency > t)
            idx = min(n - 1, max(0, int(round((1.0 - p) * n)) - 1))
            m = sal > flat[idx]
            if invert:
                m = ~m
            out = self._finish(m[None, None], h, w)[0]
            if self._in_range(out.float().mean().item()):
                return out
        # Saliency without usable structure (flat image, ties): a random rectangle.
        u = _uniform(generator, 3)
        target = lo + (hi - lo) * (0.25 + 0.5 * u[0].item())
        area = 1.0 - target if invert else target
        fh = math.sqrt(area) + (1.0 - math.sqrt(area)) * u[1].item() * 0.5
        fw = min(1.0, area / fh)
        rh, rw = max(1, round(fh * h)), max(1, round(fw * w))
        y0 = int((h - rh) * u[2].item())
        x0 = int((w - rw) * (1.0 - u[2].item()))
        rect = torch.zeros(1, 1, h, w, dtype=torch.bool, device=sal.device)
        rect[..., y0:y0 + rh, x0:x0 + rw] = True
        if invert:
            rect = ~rect
        for cand in (self._finish(rect, h, w)[0], rect[0]):
            if self._in_range(cand.float().mean().item()):
                return cand
        # Last resort (tiny images where rounding broke the rectangle): exactly enough pixels.
        total = h * w
        need_lo, need_hi = math.ceil(lo * total), math.floor(hi * total)
        if need_lo > need_hi:
            raise FilterError(
                f"InpaintFilter: a {h}x{w} image cannot meet coverage {list(self.coverage)}; use larger images"
            )
        count = min(max(round(target * total), need_lo), need_hi)
        band = torch.zeros(total, dtype=torch.bool, device=sal.device)
        band[:count] = True
        return band.view(1, h, w)

    def make_mask(
        self,
        images: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        threshold: Optional[float] = None,
        outpaint: Optional[bool] = None,
    ) -> torch.Tensor:
        """Boolean masks (B,1,H,W) for ``images`` (True = pixel to regenerate)."""
        b, _, h, w = images.shape
        if h < 4 or w < 4:
            raise FilterError(f"InpaintFilter: images must be at least 4x4, got {h}x{w}")
        if self.saliency == "model":
            return self._model_mask(images, generator, threshold, outpaint)
        x = images.float()
        sal = spectral_residual_saliency(x, side=min(self.SALIENCY_SIDE, h, w))
        work = min(self.WORKING_SIDE, h, w) / min(h, w)
        work_size = (max(1, round(h * work)), max(1, round(w * work)))
        sal = F.interpolate(sal, size=work_size, mode="bilinear", align_corners=False)

        # Random draws happen in a fixed order (all thresholds, then all outpaint coins) so the
        # result depends only on the generator state, not on which images need a coverage fix.
        draws = _uniform(generator, 2 * b)
        if threshold is None:
            t = self.threshold[0] + (self.threshold[1] - self.threshold[0]) * draws[:b]
        else:
            t = torch.full((b,), float(threshold))
        if outpaint is None:
            inv = draws[b:] < self.p_outpaint
        else:
            inv = torch.full((b,), bool(outpaint))
        inv = inv.to(sal.device)
        m = sal > t.to(sal.device, sal.dtype).view(b, 1, 1, 1)
        m = m ^ inv.view(b, 1, 1, 1)
        out = self._finish(m, h, w)
        fracs = out.float().mean(dim=(1, 2, 3))
        for i in range(b):
            f = fracs[i].item()
            if not self._in_range(f):
                out[i] = self._fix_coverage(sal[i, 0], bool(inv[i]), f, h, w, generator)
        return out

    @staticmethod
    def _explicit_mask(mask: Any, b: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise FilterError(
                f"InpaintFilter: mask must be a boolean torch.Tensor (True = regenerate), got {got}; "
                "use mask > 0.5 for a float mask"
            )
        m = mask
        if m.dim() == 2:
            m = m[None, None]
        elif m.dim() == 3:
            m = m[:, None]
        if m.dim() != 4 or m.shape[1] != 1 or m.shape[-2:] != (h, w) or m.shape[0] not in (1, b):
            raise FilterError(
                f"InpaintFilter: mask shape {tuple(mask.shape)} does not fit images of batch {b} and size "
                f"{h}x{w}; use (H,W), (B,H,W), (1,1,H,W) or (B,1,H,W)"
            )
        return m.to(device).expand(b, 1, h, w)

    @torch.no_grad()
    def __call__(
        self,
        images: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        mask: Optional[torch.Tensor] = None,
        threshold: Optional[float] = None,
        outpaint: Optional[bool] = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked images + mask, see the class docstring. ``threshold`` (a float in [0,1]) fixes the
        saliency threshold, ``outpaint`` (bool) forces/forbids the inversion."""
        _reject_kwargs(kwargs, "InpaintFilter", ("mask", "threshold", "outpaint"))
        images = _check_images(images, "InpaintFilter").to(self.device)
        _check_generator(generator, "InpaintFilter")
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1
        ):
            raise FilterError(f"InpaintFilter: threshold must be a number in [0,1], got {threshold!r}")
        if outpaint is not None and not isinstance(outpaint, bool):
            raise FilterError(f"InpaintFilter: outpaint must be True, False or None, got {outpaint!r}")
        b, _, h, w = images.shape
        if mask is not None:
            m = self._explicit_mask(mask, b, h, w, images.device)
        else:
            m = self.make_mask(images, generator, threshold, outpaint)
        masked = torch.where(m, torch.ones_like(images), images)
        return torch.cat([masked, m.to(images.dtype)], dim=1), masked


# --------------------------------------------------------------------------------------------------
# Super-resolution


class SRFilter:
    """Super-resolution degradation (3 channels): nearest downscale by ``scale_factor`` then nearest
    upscale back to (H, W).

    Params:
        scale_factor: downscale factor in (0, 1] (official 1/4).
        device: where the output lives.

    Returns ``(degraded (B,3,H,W), the same tensor as the preview)``.
    """

    def __init__(self, scale_factor: float = 0.25, device: DeviceLike = "cpu") -> None:
        self.scale_factor = _check_scale_factor(scale_factor, "SRFilter")
        self.device = torch.device(device)

    def num_channels(self) -> int:
        return 3

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, generator: Optional[torch.Generator] = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _reject_kwargs(kwargs, "SRFilter", ())
        images = _check_images(images, "SRFilter").to(self.device)
        _check_generator(generator, "SRFilter")
        h, w = images.shape[-2:]
        small = F.interpolate(images, scale_factor=self.scale_factor, mode="nearest")
        if min(small.shape[-2:]) < 1:
            raise FilterError(f"SRFilter: scale_factor {self.scale_factor} leaves nothing of a {h}x{w} image")
        out = F.interpolate(small, size=(h, w), mode="nearest")
        return out, out


class SREffnetFilter:
    """Super-resolution ControlNet input (16 channels): the Stage C latent of a downscaled image.

    ``x_small`` = nearest downscale by ``scale_factor``; ``e = effnet(ImageNet-normalised x_small)``;
    returns ``(nearest upsample of e by 1/scale_factor, nearest upsample of x_small to (H, W))`` —
    the first is the ControlNet input (for 0.5: the latent of the half-resolution image at the
    full-resolution latent size), the second the preview.

    Params:
        device: where the output lives.
        scale_factor: downscale factor in (0, 1] (official 0.5).
        effnet: the LOADED ``modules.effnet.EfficientNetEncoder`` (any module mapping normalised RGB
            to (B,16,h/32,w/32) works). The filter loads no file itself (the official one read a
            hard-coded path): the training script loads the encoder from ``effnet_checkpoint_path``
            and passes it here, or sets ``filter.effnet`` later. It is switched to eval mode (the
            encoder always runs with BN running statistics) and run in its own dtype/device.
    """

    def __init__(
        self, device: DeviceLike = "cpu", scale_factor: float = 0.5, effnet: Optional[torch.nn.Module] = None
    ) -> None:
        self.device = torch.device(device)
        self.scale_factor = _check_scale_factor(scale_factor, "SREffnetFilter")
        if effnet is not None and not callable(effnet):
            raise FilterError(f"SREffnetFilter: effnet must be the loaded EfficientNetEncoder, got {type(effnet).__name__}")
        self.effnet = effnet

    def num_channels(self) -> int:
        return 16

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, generator: Optional[torch.Generator] = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _reject_kwargs(kwargs, "SREffnetFilter", ())
        images = _check_images(images, "SREffnetFilter").to(self.device)
        _check_generator(generator, "SREffnetFilter")
        effnet = self.effnet
        if effnet is None:
            raise FilterError(
                "SREffnetFilter: no EfficientNet encoder; the training script must pass the loaded "
                "encoder (modules.effnet.EfficientNetEncoder with effnet_checkpoint_path loaded) as "
                "SREffnetFilter(..., effnet=encoder) or set filter.effnet = encoder"
            )
        if isinstance(effnet, torch.nn.Module) and effnet.training:
            effnet.eval()
        h, w = images.shape[-2:]
        small = F.interpolate(images, scale_factor=self.scale_factor, mode="nearest")
        inp = imagenet_normalize(small)
        param = next(iter(effnet.parameters()), None) if isinstance(effnet, torch.nn.Module) else None
        if param is not None:
            inp = inp.to(device=param.device, dtype=param.dtype)
        latent = effnet(inp)
        if not isinstance(latent, torch.Tensor) or latent.dim() != 4:
            raise FilterError("SREffnetFilter: effnet must return a (B,C,h,w) tensor")
        latent = F.interpolate(latent.float(), scale_factor=1.0 / self.scale_factor, mode="nearest")
        preview = F.interpolate(small, size=(h, w), mode="nearest")
        return latent.to(device=self.device, dtype=images.dtype), preview


# --------------------------------------------------------------------------------------------------
# Identity (faces)

# 12 distinct preview colours (RGB in [0,1]); indexed with len(_PALETTE), not the official `j % 13`.
_PALETTE = (
    (0.90, 0.10, 0.10), (0.10, 0.70, 0.10), (0.10, 0.30, 0.90), (0.95, 0.80, 0.10),
    (0.80, 0.10, 0.80), (0.10, 0.80, 0.80), (1.00, 0.50, 0.00), (0.50, 0.00, 1.00),
    (0.00, 0.50, 0.25), (0.60, 0.30, 0.10), (1.00, 0.60, 0.70), (0.50, 0.50, 0.50),
)

_FACE_MODEL_HELP = (
    "IdentityFilter needs a face detection + embedding model. Install the default one with "
    "'pip install insightface onnxruntime' (onnxruntime-gpu for CUDA) and put the buffalo_l model "
    "files (det_10g.onnx, w600k_r50.onnx, ...) in <root>/models/buffalo_l/ (root defaults to "
    "~/.insightface), or plug in your own with face_model='package.module:ClassName' (a class with "
    "detect_and_embed(image_uint8_hwc_rgb) -> list of (box_xyxy, embedding_512))"
)


class InsightFaceModel:
    """Face model plug-in backed by insightface's ``FaceAnalysis`` (the model pack the official
    filter used: buffalo_l = SCRFD det_10g detection + ArcFace w600k_r50 embeddings).

    Params:
        name: insightface model pack (default ``buffalo_l``).
        root: insightface root folder; model files are read from ``<root>/models/<name>/``
            (default ``~/.insightface``).
        det_size: detector input size (official 320×320).
        det_thresh: detection score threshold (official 0.5).
        ctx_id: onnxruntime device id (0 = first GPU when onnxruntime-gpu is installed; -1 CPU).
        providers: onnxruntime execution providers (None: insightface's default).
        allow_download: let insightface download a missing model pack (default False: a clear error
            names the folder instead, so nothing downloads during a training run).
    """

    def __init__(
        self,
        name: str = "buffalo_l",
        root: Optional[str] = None,
        det_size: Sequence[int] = (320, 320),
        det_thresh: float = 0.5,
        ctx_id: int = 0,
        providers: Optional[Sequence[str]] = None,
        allow_download: bool = False,
    ) -> None:
        try:
            from insightface.app import FaceAnalysis  # optional dependency
        except ImportError as exc:
            raise MissingDependencyError(f"insightface is not installed. {_FACE_MODEL_HELP}") from exc
        root = os.path.expanduser(root or os.path.join("~", ".insightface"))
        folder = os.path.join(root, "models", name)
        has_models = os.path.isdir(folder) and any(f.endswith(".onnx") for f in os.listdir(folder))
        if not has_models and not allow_download:
            raise MissingDependencyError(
                f"insightface model pack {name!r} not found in {folder}. {_FACE_MODEL_HELP} "
                "(or pass allow_download=True to let insightface fetch it)"
            )
        kwargs: dict[str, Any] = {"name": name, "root": root, "allowed_modules": ["detection", "recognition"]}
        if providers is not None:
            kwargs["providers"] = list(providers)
        self.app = FaceAnalysis(**kwargs)
        self.app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=tuple(det_size))

    def detect_and_embed(self, image: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Faces in an RGB uint8 HWC image as (box_xyxy, L2-normalised 512-d embedding)."""
        bgr = np.ascontiguousarray(image[..., ::-1])  # insightface expects OpenCV's BGR order
        return [(np.asarray(f.bbox, dtype=np.float32), np.asarray(f.normed_embedding, dtype=np.float32))
                for f in self.app.get(bgr)]


_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def _import_object(path: str, what: str) -> Any:
    """Import ``package.module:Attr[.Attr]`` with importlib (no eval)."""
    if not _IMPORT_PATH.match(path):
        raise FilterError(f"{what} {path!r} is not of the form 'package.module:ClassName'")
    module_name, attr_path = path.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise FilterError(f"{what} {path!r}: cannot import module {module_name!r} ({exc})") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise FilterError(f"{what} {path!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    return obj


def load_face_model(spec: Any, **kwargs: Any) -> Any:
    """A face model for :class:`IdentityFilter`.

    ``spec`` is ``"insightface"`` (:class:`InsightFaceModel`, ``kwargs`` go to its constructor),
    ``"package.module:ClassName"`` (the class is imported and constructed with ``kwargs``), or an
    object that already has ``detect_and_embed`` (returned unchanged). The model's
    ``detect_and_embed(image_uint8_hwc_rgb)`` returns a list of ``(box_xyxy, embedding_512)``.
    """
    if spec is None:
        raise FilterError(f"no face model given. {_FACE_MODEL_HELP}")
    if not isinstance(spec, str):
        if callable(getattr(spec, "detect_and_embed", None)):
            return spec
        raise FilterError(f"face model {type(spec).__name__} has no detect_and_embed method. {_FACE_MODEL_HELP}")
    if spec == "insightface":
        return InsightFaceModel(**kwargs)
    if ":" not in spec:
        raise FilterError(f"unknown face model {spec!r}: use 'insightface' or 'package.module:ClassName'")
    cls = _import_object(spec, "face model")
    model = cls(**kwargs) if callable(cls) else cls
    if not callable(getattr(model, "detect_and_embed", None)):
        raise FilterError(f"face model {spec!r} has no detect_and_embed(image) method")
    return model


class IdentityFilter:
    """Face-identity map (512 channels): the face embeddings written into their boxes on the
    Stage C latent grid (docs/OFFICIAL.md, ControlNet filters).

    Per image the face model returns ``(box_xyxy, embedding_512)`` pairs (pixel coordinates of the
    RGB uint8 image, ``x*255`` truncated). Faces are ranked like insightface's detector ranks them
    (box area − 2·squared offset of the box centre from the image centre) and the first
    ``max_faces`` kept. Output map: zeros (B,512,H//32,W//32); for each face, kept with probability
    ``1 − p_drop``: box/32 → clamp ≥ 0 → round → int, clamped inside the map with end ≥ start+1; if
    it is the only face of the image, with probability ``p_full`` the box becomes the whole map; the
    embedding is written into the box region (later faces overwrite earlier ones where boxes
    overlap). Preview: the image darkened, with each written box (scaled back ×32) tinted in a
    palette colour (``j % len(palette)``; the official ``j % 13`` over 12 colours was a defect).

    Params:
        device: where the output lives.
        max_faces: most faces used per image (official 4).
        p_drop: probability of dropping each face (official training 0.05, inference 0).
        p_full: probability that a single face fills the whole map (official training 0.3, inference 0).
        face_model: a face model object (``detect_and_embed``), a spec for :func:`load_face_model`
            (``"insightface"`` or ``"package.module:ClassName"``), or None = ``"insightface"``, loaded
            at the first call (so ``num_channels()`` works without the dependency).
        face_model_params: keyword arguments for the face model's constructor when ``face_model``
            is a name (e.g. ``{root: /data/insightface}`` for :class:`InsightFaceModel`).
    """

    EMBED_DIM = 512
    STRIDE = 32

    def __init__(
        self,
        device: DeviceLike = "cpu",
        max_faces: int = 4,
        p_drop: float = 0.05,
        p_full: float = 0.3,
        face_model: Any = None,
        face_model_params: Optional[dict] = None,
    ) -> None:
        if isinstance(max_faces, bool) or not isinstance(max_faces, int) or max_faces < 1:
            raise FilterError(f"IdentityFilter: max_faces must be an integer >= 1, got {max_faces!r}")
        self.device = torch.device(device)
        self.max_faces = max_faces
        self.p_drop = _check_probability(p_drop, "p_drop", "IdentityFilter")
        self.p_full = _check_probability(p_full, "p_full", "IdentityFilter")
        if face_model_params is not None and not isinstance(face_model_params, dict):
            raise FilterError(f"IdentityFilter: face_model_params must be a mapping, got {type(face_model_params).__name__}")
        self.face_model_params = dict(face_model_params or {})
        if isinstance(face_model, str):
            # Check the spec's form now (a YAML typo should fail at startup); load at the first call.
            if face_model != "insightface" and not _IMPORT_PATH.match(face_model):
                raise FilterError(
                    f"IdentityFilter: face_model {face_model!r} must be 'insightface' or 'package.module:ClassName'"
                )
        elif face_model is not None:
            if self.face_model_params:
                raise FilterError("IdentityFilter: face_model_params only apply when face_model is a name")
            face_model = load_face_model(face_model)  # validates the object now
        self._face_model = face_model

    def num_channels(self) -> int:
        return self.EMBED_DIM

    @property
    def face_model(self) -> Any:
        if self._face_model is None or isinstance(self._face_model, str):
            self._face_model = load_face_model(self._face_model or "insightface", **self.face_model_params)
        return self._face_model

    def _faces(self, image: np.ndarray) -> list[tuple[np.ndarray, torch.Tensor]]:
        raw = self.face_model.detect_and_embed(image)
        faces = []
        for n, item in enumerate(raw or []):
            try:
                box, emb = item
            except (TypeError, ValueError) as exc:
                raise FilterError(f"IdentityFilter: face model returned {item!r}; expected (box_xyxy, embedding)") from exc
            box = np.asarray(box, dtype=np.float64).reshape(-1)
            emb_t = torch.as_tensor(np.asarray(emb, dtype=np.float32)).reshape(-1)
            if box.shape[0] != 4 or not np.all(np.isfinite(box)):
                raise FilterError(f"IdentityFilter: face {n}: box must be 4 finite numbers x0,y0,x1,y1, got {box.tolist()}")
            if emb_t.numel() != self.EMBED_DIM:
                raise FilterError(f"IdentityFilter: face {n}: embedding must have {self.EMBED_DIM} values, got {emb_t.numel()}")
            faces.append((box, emb_t))
        # Same ranking as insightface's SCRFD.detect(max_num=...): big, central faces first.
        cy, cx = image.shape[0] // 2, image.shape[1] // 2

        def score(face: tuple[np.ndarray, torch.Tensor]) -> float:
            x0, y0, x1, y1 = face[0]
            off = ((x0 + x1) / 2 - cx) ** 2 + ((y0 + y1) / 2 - cy) ** 2
            return float((x1 - x0) * (y1 - y0) - 2.0 * off)

        faces.sort(key=score, reverse=True)  # stable: ties keep the model's order
        return faces[: self.max_faces]

    @staticmethod
    def _span(a: float, b: float, size: int) -> tuple[int, int]:
        start = int(round(max(a / IdentityFilter.STRIDE, 0.0)))
        end = int(round(max(b / IdentityFilter.STRIDE, 0.0)))
        start = min(start, size - 1)
        end = min(max(end, start + 1), size)
        return start, end

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, generator: Optional[torch.Generator] = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _reject_kwargs(kwargs, "IdentityFilter", ())
        images = _check_images(images, "IdentityFilter")
        _check_generator(generator, "IdentityFilter")
        b, _, h, w = images.shape
        mh, mw = h // self.STRIDE, w // self.STRIDE
        if mh < 1 or mw < 1:
            raise FilterError(f"IdentityFilter: images must be at least 32x32 (the map is H//32 x W//32), got {h}x{w}")
        arr = _to_uint8_hwc(images)
        idmap = torch.zeros(b, self.EMBED_DIM, mh, mw)
        preview = images.detach().float().cpu().clamp(0, 1) * 0.35
        for i in range(b):
            faces = self._faces(arr[i])
            # Two draws per face, always, so the random stream does not depend on earlier outcomes.
            draws = _uniform(generator, 2 * len(faces)) if faces else torch.empty(0)
            for j, (box, emb) in enumerate(faces):
                if draws[2 * j].item() < self.p_drop:
                    continue
                if len(faces) == 1 and draws[2 * j + 1].item() < self.p_full:
                    y0, y1, x0, x1 = 0, mh, 0, mw
                else:
                    x0, x1 = self._span(box[0], box[2], mw)
                    y0, y1 = self._span(box[1], box[3], mh)
                idmap[i, :, y0:y1, x0:x1] = emb.view(-1, 1, 1)
                colour = torch.tensor(_PALETTE[j % len(_PALETTE)]).view(3, 1, 1)
                s = self.STRIDE
                region = images[i, :, y0 * s:y1 * s, x0 * s:x1 * s].detach().float().cpu().clamp(0, 1)
                preview[i, :, y0 * s:y1 * s, x0 * s:x1 * s] = 0.5 * region + 0.5 * colour
        return idmap.to(self.device), preview.to(device=self.device, dtype=images.dtype)


# --------------------------------------------------------------------------------------------------
# registry / custom filters

FILTERS: dict[str, type] = {
    "CannyFilter": CannyFilter,
    "InpaintFilter": InpaintFilter,
    "SREffnetFilter": SREffnetFilter,
    "SRFilter": SRFilter,
    "IdentityFilter": IdentityFilter,
}


def _defines(cls: type, name: str) -> bool:
    """True if ``cls`` (not ``object``/``type``) defines ``name`` as a callable attribute."""
    for klass in cls.__mro__:
        if klass is object:
            continue
        if name in vars(klass):
            return callable(getattr(cls, name))
    return False


def resolve_filter(name_or_path: str, params: Optional[dict] = None) -> Any:
    """Build the ControlNet filter named by the YAML key ``controlnet_filter`` with the kwargs of
    ``controlnet_filter_params``.

    ``name_or_path`` is a bare name from :data:`FILTERS` (``CannyFilter``, ``InpaintFilter``,
    ``SREffnetFilter``, ``SRFilter``, ``IdentityFilter``) or ``"package.module:ClassName"`` for a
    user filter (imported with importlib; no eval). The class must define ``num_channels()`` and
    ``__call__``. Unknown parameter names are an error naming the accepted ones (from the
    constructor signature), so a typo in the YAML does not silently fall back to a default.
    Runtime objects (e.g. ``effnet=`` for ``SREffnetFilter``) can be passed in ``params`` too.
    """
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise FilterError(f"controlnet_filter_params must be a mapping of parameter names to values, got {type(params).__name__}")
    if not isinstance(name_or_path, str) or not name_or_path:
        raise FilterError(f"controlnet_filter must be a filter name or 'package.module:ClassName', got {name_or_path!r}")
    if ":" in name_or_path:
        cls = _import_object(name_or_path, "controlnet_filter")
    elif name_or_path in FILTERS:
        cls = FILTERS[name_or_path]
    else:
        raise FilterError(
            f"unknown controlnet_filter {name_or_path!r}; known filters: {', '.join(FILTERS)} "
            "(or give a custom one as 'package.module:ClassName')"
        )
    if not inspect.isclass(cls):
        raise FilterError(f"controlnet_filter {name_or_path!r} is not a class (got {type(cls).__name__})")
    missing = [m for m in ("num_channels", "__call__") if not _defines(cls, m)]
    if missing:
        raise FilterError(
            f"controlnet_filter {name_or_path!r} must define num_channels() and __call__(images, generator=None); "
            f"missing: {', '.join(missing)}"
        )
    sig = inspect.signature(cls)
    accepted = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    if not takes_any:
        unknown = [k for k in params if k not in accepted]
        if unknown:
            raise FilterError(
                f"unknown parameter {unknown[0]!r} for controlnet_filter {name_or_path}; "
                f"accepted parameters: {', '.join(accepted) or 'none'}"
            )
    try:
        sig.bind(**params)
    except TypeError as exc:
        raise FilterError(f"controlnet_filter {name_or_path}: bad parameters {sorted(params)}: {exc}") from exc
    return cls(**params)

