"""``FILTERS`` by name and ``resolve_filter``: a filter from the YAML keys ``controlnet_filter`` /
``controlnet_filter_params``."""
from __future__ import annotations

import inspect
from typing import Any, Optional

from modules.filters.canny import CannyFilter
from modules.filters.common import FilterError, import_object
from modules.filters.identity import IdentityFilter
from modules.filters.inpaint import InpaintFilter
from modules.filters.sr import SRFilter
from modules.filters.sr_effnet import SREffnetFilter


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
        cls = import_object(name_or_path, "controlnet_filter")
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
