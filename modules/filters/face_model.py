"""The face model of ``IdentityFilter``: the insightface plug-in and ``load_face_model``."""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np

from modules.filters.common import FilterError, import_object, MissingDependencyError


FACE_MODEL_HELP = (
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
            raise MissingDependencyError(f"insightface is not installed. {FACE_MODEL_HELP}") from exc
        root = os.path.expanduser(root or os.path.join("~", ".insightface"))
        folder = os.path.join(root, "models", name)
        has_models = os.path.isdir(folder) and any(f.endswith(".onnx") for f in os.listdir(folder))
        if not has_models and not allow_download:
            raise MissingDependencyError(
                f"insightface model pack {name!r} not found in {folder}. {FACE_MODEL_HELP} "
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


def load_face_model(spec: Any, **kwargs: Any) -> Any:
    """A face model for :class:`IdentityFilter`.

    ``spec`` is ``"insightface"`` (:class:`InsightFaceModel`, ``kwargs`` go to its constructor),
    ``"package.module:ClassName"`` (the class is imported and constructed with ``kwargs``), or an
    object that already has ``detect_and_embed`` (returned unchanged). The model's
    ``detect_and_embed(image_uint8_hwc_rgb)`` returns a list of ``(box_xyxy, embedding_512)``.
    """
    if spec is None:
        raise FilterError(f"no face model given. {FACE_MODEL_HELP}")
    if not isinstance(spec, str):
        if callable(getattr(spec, "detect_and_embed", None)):
            return spec
        raise FilterError(f"face model {type(spec).__name__} has no detect_and_embed method. {FACE_MODEL_HELP}")
    if spec == "insightface":
        return InsightFaceModel(**kwargs)
    if ":" not in spec:
        raise FilterError(f"unknown face model {spec!r}: use 'insightface' or 'package.module:ClassName'")
    cls = import_object(spec, "face model")
    model = cls(**kwargs) if callable(cls) else cls
    if not callable(getattr(model, "detect_and_embed", None)):
        raise FilterError(f"face model {spec!r} has no detect_and_embed(image) method")
    return model
