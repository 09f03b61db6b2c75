"""``CannyFilter``: the Canny edge map of the official canny ControlNet."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from modules.filters.common import check_call, DeviceLike, FilterError, to_uint8_hwc


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
        arr = to_uint8_hwc(x)
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
        images = check_call("CannyFilter", images, generator, kwargs)
        h, w = images.shape[-2:]
        edges = self.edges_at_working_size(images)
        if edges.shape[-2:] != (h, w):
            edges = F.interpolate(edges, size=(h, w), mode="bilinear", align_corners=False)
        edges = edges.to(self.device)
        return edges, edges.expand(-1, 3, -1, -1).clone()
