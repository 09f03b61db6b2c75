"""``InpaintFilter``: masked image + mask of the official inpainting ControlNet, and the
spectral-residual saliency it can use instead of the released saliency network."""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from modules.filters.common import (
    check_call, check_probability, default_sigma, DeviceLike, FilterError, gaussian_blur_separable,
    uniform)


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
        self.p_outpaint = check_probability(p_outpaint, "p_outpaint", "InpaintFilter")
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
        return k, default_sigma(k) if k > 1 else 1.0

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
        draws = uniform(generator, 2)
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
        u = uniform(generator, 3)
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
        draws = uniform(generator, 2 * b)
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
        images = check_call("InpaintFilter", images, generator, kwargs, ("mask", "threshold", "outpaint")).to(self.device)
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
