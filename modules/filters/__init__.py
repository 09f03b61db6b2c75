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

The package holds one file per filter (canny, inpaint, sr, sr_effnet, identity + face_model), what
they share (common) and the registry.
"""
from __future__ import annotations

from modules.filters.canny import CannyFilter
from modules.filters.common import FilterError, MissingDependencyError, gaussian_blur_separable
from modules.filters.face_model import InsightFaceModel, load_face_model
from modules.filters.identity import IdentityFilter
from modules.filters.inpaint import InpaintFilter, spectral_residual_saliency
from modules.filters.registry import FILTERS, resolve_filter
from modules.filters.sr import SRFilter
from modules.filters.sr_effnet import SREffnetFilter

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
