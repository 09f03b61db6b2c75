"""``IdentityFilter``: face embeddings written into the Stage C latent grid (the official identity
ControlNet's input)."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from modules.filters.common import (
    check_call, check_probability, DeviceLike, FilterError, IMPORT_PATH, to_uint8_hwc, uniform)
from modules.filters.face_model import load_face_model

# 12 distinct preview colours (RGB in [0,1]); indexed with len(_PALETTE), not the official `j % 13`.
_PALETTE = (
    (0.90, 0.10, 0.10), (0.10, 0.70, 0.10), (0.10, 0.30, 0.90), (0.95, 0.80, 0.10),
    (0.80, 0.10, 0.80), (0.10, 0.80, 0.80), (1.00, 0.50, 0.00), (0.50, 0.00, 1.00),
    (0.00, 0.50, 0.25), (0.60, 0.30, 0.10), (1.00, 0.60, 0.70), (0.50, 0.50, 0.50),
)


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
        self.p_drop = check_probability(p_drop, "p_drop", "IdentityFilter")
        self.p_full = check_probability(p_full, "p_full", "IdentityFilter")
        if face_model_params is not None and not isinstance(face_model_params, dict):
            raise FilterError(f"IdentityFilter: face_model_params must be a mapping, got {type(face_model_params).__name__}")
        self.face_model_params = dict(face_model_params or {})
        if isinstance(face_model, str):
            # Check the spec's form now (a YAML typo should fail at startup); load at the first call.
            if face_model != "insightface" and not IMPORT_PATH.match(face_model):
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
        images = check_call("IdentityFilter", images, generator, kwargs)
        b, _, h, w = images.shape
        mh, mw = h // self.STRIDE, w // self.STRIDE
        if mh < 1 or mw < 1:
            raise FilterError(f"IdentityFilter: images must be at least 32x32 (the map is H//32 x W//32), got {h}x{w}")
        arr = to_uint8_hwc(images)
        idmap = torch.zeros(b, self.EMBED_DIM, mh, mw)
        preview = images.detach().float().cpu().clamp(0, 1) * 0.35
        for i in range(b):
            faces = self._faces(arr[i])
            # Two draws per face, always, so the random stream does not depend on earlier outcomes.
            draws = uniform(generator, 2 * len(faces)) if faces else torch.empty(0)
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
