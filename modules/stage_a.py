"""Stage A: the VQGAN that maps 3xHxW images in [0,1] to a 4-channel latent at 1/4 resolution and back.

Layout and semantics follow the released ``stage_a.safetensors`` (docs/OFFICIAL.md, Stage A): encoder
(``in_block``, ``down_blocks`` ending in an affine BatchNorm), vector quantizer (``vquantizer`` with
an 8192x4 codebook parameter) and decoder (``up_blocks``, ``out_block``). Latents are divided by
``scale_factor`` (0.43) on encode and multiplied back on decode. Stage B is trained on and generates
the UNquantised latents, so ``encode(x)`` does not quantise unless asked.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class ResBlock(nn.Module):
    """Stage A residual block: replication-padded depthwise conv + channel MLP, gated by 6 scalars.

    ``gammas`` = (scale1, shift1, gate1, scale2, shift2, gate2), zero-initialised, so a fresh block is
    the identity. Different from the Stage B/C ``ResBlock`` (no GRN, no skip input).
    """

    def __init__(self, c: int, c_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6), requires_grad=True)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        g = self.gammas
        h = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + self.depthwise(h * (1 + g[0]) + g[1]) * g[2]
        h = self.norm2(x.permute(0, 2, 3, 1))
        x = x + self.channelwise(h * (1 + g[3]) + g[4]).permute(0, 3, 1, 2) * g[5]
        return x


class VectorQuantize(nn.Module):
    """Nearest-codebook-entry quantizer with a straight-through gradient (no EMA updates).

    The codebook is an ``nn.Embedding`` PARAMETER (``codebook.weight``, k x embedding_size); it is
    trained only through ``vq_loss``.
    """

    def __init__(self, embedding_size: int, k: int):
        super().__init__()
        self.codebook = nn.Embedding(k, embedding_size)

    def forward(self, x: Tensor, dim: int = 1) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
        """Quantise ``x`` along ``dim``; returns ``(quantised, (vq_loss, commit_loss), indices)``.

        ``indices`` has x's shape without ``dim`` (int64); ties pick the first (lowest) index.
        """
        x_last = x.movedim(dim, -1)
        flat = x_last.reshape(-1, x_last.shape[-1])
        codebook = self.codebook.weight
        # ||c||^2 + ||x||^2 - 2 x.c as one addmm; the codebook is detached so only the losses train it
        cb = codebook.detach()
        dist = torch.addmm(
            (cb.pow(2).sum(1)[None, :] + flat.detach().pow(2).sum(1, keepdim=True)),
            flat.detach(), cb.t(), beta=1, alpha=-2,
        )
        indices = dist.argmin(dim=1)
        selected = codebook[indices]  # carries the codebook gradient for vq_loss
        vq_loss = F.mse_loss(selected, flat.detach())
        commit_loss = F.mse_loss(flat, selected.detach())
        # straight-through: value of the codebook entry, gradient of the identity w.r.t. x
        quantised = selected.detach() + (flat - flat.detach())
        quantised = quantised.reshape(x_last.shape).movedim(-1, dim)
        return quantised, (vq_loss, commit_loss), indices.reshape(x_last.shape[:-1])


class StageA(nn.Module):
    """The Stable Cascade VQGAN (``StageA()`` is the released configuration, 18.4M parameters).

    Input images are RGB in [0,1] (no normalisation); H and W must be multiples of 4.
    BatchNorm at the end of the encoder uses running statistics in eval mode: call ``.eval()``.
    """

    def __init__(
        self,
        levels: int = 2,
        bottleneck_blocks: int = 12,
        c_hidden: int = 384,
        c_latent: int = 4,
        codebook_size: int = 8192,
        scale_factor: float = 0.43,
    ):
        super().__init__()
        if levels < 1 or bottleneck_blocks < 1:
            raise ValueError(f"StageA: levels ({levels}) and bottleneck_blocks ({bottleneck_blocks}) must be >= 1")
        if c_hidden % (2 ** (levels - 1)):
            raise ValueError(f"StageA: c_hidden={c_hidden} must be divisible by 2**(levels-1)={2 ** (levels - 1)}")
        self.c_latent = c_latent
        self.scale_factor = scale_factor
        c_levels = [c_hidden // (2 ** (levels - 1 - i)) for i in range(levels)]
        self.gradient_checkpointing = False

        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, c_levels[0], kernel_size=1))
        down: list[nn.Module] = []
        for i, c in enumerate(c_levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c, kernel_size=4, stride=2, padding=1))
            down.append(ResBlock(c, c * 4))
        down.append(nn.Sequential(nn.Conv2d(c_levels[-1], c_latent, kernel_size=1, bias=False), nn.BatchNorm2d(c_latent)))
        self.down_blocks = nn.Sequential(*down)

        self.vquantizer = VectorQuantize(c_latent, k=codebook_size)

        up: list[nn.Module] = [nn.Sequential(nn.Conv2d(c_latent, c_levels[-1], kernel_size=1))]
        for i in range(levels):
            c = c_levels[levels - 1 - i]
            for _ in range(bottleneck_blocks if i == 0 else 1):
                up.append(ResBlock(c, c * 4))
            if i < levels - 1:
                up.append(nn.ConvTranspose2d(c, c_levels[levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2))

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each Stage A ResBlock in backward instead of storing its activations."""
        self.gradient_checkpointing = bool(enabled)

    def _run(self, blocks: nn.Sequential, x: Tensor) -> Tensor:
        for block in blocks:
            if self.gradient_checkpointing and isinstance(block, ResBlock) and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def encode(self, x: Tensor, quantize: bool = False):
        """Images (B,3,H,W) in [0,1] -> latents (B,4,H/4,W/4) divided by ``scale_factor``.

        Returns ``(latent, None, None, None)`` when ``quantize`` is False, else
        ``(quantised/scale, unquantised/scale, indices (B,H/4,W/4), vq_loss + 0.25 * commit_loss)``.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"StageA.encode: expected images (B,3,H,W), got {tuple(x.shape)}")
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"StageA.encode: H and W must be multiples of 4, got {tuple(x.shape[-2:])}")
        z = self._run(self.down_blocks, self.in_block(x))
        if not quantize:
            return z / self.scale_factor, None, None, None
        q, (vq_loss, commit_loss), indices = self.vquantizer(z, dim=1)
        return q / self.scale_factor, z / self.scale_factor, indices, vq_loss + commit_loss * 0.25

    def decode(self, x: Tensor) -> Tensor:
        """Latents (B,4,h,w) (scaled as ``encode`` returns them) -> images (B,3,4h,4w), not clamped."""
        if x.ndim != 4 or x.shape[1] != self.c_latent:
            raise ValueError(f"StageA.decode: expected latents (B,{self.c_latent},h,w), got {tuple(x.shape)}")
        return self.out_block(self._run(self.up_blocks, x * self.scale_factor))

    def forward(self, x: Tensor, quantize: bool = False) -> tuple[Tensor, Tensor | None]:
        """Reconstruct images; with ``quantize=False`` the UNquantised latent is decoded."""
        latent, _, _, loss = self.encode(x, quantize)
        return self.decode(latent), loss
