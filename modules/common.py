"""Building blocks shared by StageB and StageC (docs/OFFICIAL.md, Shared blocks).

Attribute names are the official state-dict prefixes; do not rename them. Mixed precision: the
original code casts a few paths to float32 and relies on CUDA autocast to cast back. Every such
place here goes through :func:`match_dtype`, which leaves tensors alone under autocast (so the
original numerics are reproduced) and otherwise casts back to the working dtype, so that a bf16
model also runs without autocast (e.g. on CPU).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def autocast_on(t: torch.Tensor) -> bool:
    """True when autocast is active for ``t``'s device type."""
    return torch.is_autocast_enabled(t.device.type)


def match_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast ``t`` to ``dtype`` unless autocast is on (autocast then decides, as in the original)."""
    return t if autocast_on(t) else t.to(dtype)


def resize_ac(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with align_corners=True (the spec's "bilinear-AC")."""
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=True)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW tensor (applied channels-last).

    StageB/StageC build it with ``elementwise_affine=False, eps=1e-6``; ControlNet uses the PyTorch
    defaults (affine, eps 1e-5), hence the plain ``nn.LayerNorm`` signature.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _norm2d(c: int) -> LayerNorm2d:
    return LayerNorm2d(c, elementwise_affine=False, eps=1e-6)


class GlobalResponseNorm(nn.Module):
    """GRN (ConvNeXt-V2) on channels-last input (B,H,W,C); ``gamma``/``beta`` zero-initialised."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * n) + self.beta + x


def _channelwise(c_in: int, c: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(c_in, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), nn.Dropout(dropout), nn.Linear(c * 4, c)
    )


class ResBlock(nn.Module):
    """Block letter 'C': depthwise conv -> LN -> [concat skip] -> channelwise MLP, residual."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = _norm2d(c)
        self.channelwise = _channelwise(c + c_skip, c, dropout)

    def forward(self, x: torch.Tensor, x_skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        r = x
        x = self.norm(self.depthwise(x))
        if x_skip is not None:  # the skip joins AFTER the norm (checklist 1)
            x = torch.cat([x, x_skip], dim=1)
        x = self.channelwise(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + r


def mha_sdpa(mha: nn.MultiheadAttention, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """``mha(q, kv, kv)[0]`` (batch_first) computed with F.scaled_dot_product_attention.

    The weights are read through the module attributes so that parametrizations (LoRA) apply.
    Attention-probability dropout follows ``mha.training`` like nn.MultiheadAttention does.
    """
    c, h = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    qp = F.linear(q, w[:c], None if b is None else b[:c])
    # K and V share their input, so project them with one matmul.
    kvp = F.linear(kv, w[c:], None if b is None else b[c:])
    kp, vp = kvp.chunk(2, dim=-1)
    bsz, lq, lk = q.shape[0], q.shape[1], kv.shape[1]
    qp = qp.view(bsz, lq, h, c // h).transpose(1, 2)
    kp = kp.reshape(bsz, lk, h, c // h).transpose(1, 2)
    vp = vp.reshape(bsz, lk, h, c // h).transpose(1, 2)
    p = mha.dropout if mha.training else 0.0
    y = F.scaled_dot_product_attention(qp, kp, vp, dropout_p=p)
    y = y.transpose(1, 2).reshape(bsz, lq, c)
    return F.linear(y, mha.out_proj.weight, mha.out_proj.bias)


class Attention2D(nn.Module):
    """Multi-head attention of image tokens over ``kv``; ``attn`` holds the official MHA weights."""

    def __init__(self, c: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(c, nhead, dropout=dropout, bias=True, batch_first=True)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, self_attn: bool = False) -> torch.Tensor:
        b, c, h, w = x.shape
        q = x.view(b, c, h * w).permute(0, 2, 1)
        if self_attn:  # image tokens first, then the conditioning (checklist 2)
            kv = torch.cat([q, kv], dim=1)
        y = mha_sdpa(self.attn, q, kv)
        return y.permute(0, 2, 1).reshape(b, c, h, w)


class AttnBlock(nn.Module):
    """Block letter 'A': x + Attention2D(norm(x), Linear(SiLU(cond)))."""

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = _norm2d(c)
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.kv_mapper(kv)
        return x + self.attention(self.norm(x), kv, self_attn=self.self_attn)


class FeedForwardBlock(nn.Module):
    """Block letter 'F' (unused by the official configs)."""

    def __init__(self, c: int, dropout: float = 0.0):
        super().__init__()
        self.norm = _norm2d(c)
        self.channelwise = _channelwise(c, c, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.channelwise(self.norm(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TimestepBlock(nn.Module):
    """Block letter 'T': x * (1 + a) + b with (a, b) summed over ``mapper`` and ``mapper_{cond}``."""

    def __init__(self, c: int, c_timestep: int, conds: Sequence[str] = ("sca",)):
        super().__init__()
        self.mapper = nn.Linear(c_timestep, c * 2)
        self.conds = list(conds)
        for cname in self.conds:
            setattr(self, f"mapper_{cname}", nn.Linear(c_timestep, c * 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ts = t.chunk(len(self.conds) + 1, dim=1)
        a, b = self.mapper(ts[0])[:, :, None, None].chunk(2, dim=1)
        for i, cname in enumerate(self.conds):
            ac, bc = getattr(self, f"mapper_{cname}")(ts[i + 1])[:, :, None, None].chunk(2, dim=1)
            a, b = a + ac, b + bc
        return x * (1 + a) + b


#: The per-block unit of the U-Nets (StageB / StageC): each instance is one unit of gradient
#: checkpointing (:meth:`CascadeUNet.set_gradient_checkpointing` recomputes exactly these in backward)
#: and one unit of FSDP sharding (``fully_shard`` per block). Memory estimates count saved
#: activations per instance of these classes.
BLOCK_TYPES: tuple[type[nn.Module], ...] = (ResBlock, AttnBlock, TimestepBlock, FeedForwardBlock)


def checkpoint_every(setting: "bool | int") -> int:
    """The dial ``gradient_checkpointing: false | true | N`` as a period: 0 = off, 1 = every block,
    N = every N-th block."""
    if isinstance(setting, bool) or setting is None:
        return int(bool(setting))
    if int(setting) < 0:
        raise ValueError(f"gradient checkpointing period must be >= 0, got {setting}")
    return int(setting)


def checkpointed_blocks(n_blocks: int, every: int) -> list[bool]:
    """Which of ``n_blocks`` blocks (registration order, as ``modules()`` lists them) are recomputed
    in backward with period ``every`` (:func:`checkpoint_every`): blocks 0, N, 2N, ... The one
    definition of the dial; the networks and the memory estimate both read it."""
    return [every > 0 and i % every == 0 for i in range(n_blocks)]


def gen_r_embedding(r: torch.Tensor, c_r: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of r (B,) -> (B, c_r): sin block then cos block (float32)."""
    r = r.float() * max_positions
    half = c_r // 2
    k = math.log(max_positions) / (half - 1)
    freq = torch.arange(half, device=r.device).float().mul(-k).exp()
    arg = r[:, None] * freq[None, :]
    emb = torch.cat([arg.sin(), arg.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class UpDownBlock2d(nn.Module):
    """Level transition of StageC: 1x1 conv plus an optional bilinear-AC resampler.

    Each sub-block sees float32 input (as in the original). Under autocast the output dtype is what
    autocast makes of it; without autocast the conv runs in float32 and the result is cast back to
    the input dtype.
    """

    def __init__(self, c_in: int, c_out: int, mode: str, enabled: bool = True):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"UpDownBlock2d mode must be 'up' or 'down', got {mode!r}")
        interp = (
            nn.Upsample(scale_factor=2 if mode == "up" else 0.5, mode="bilinear", align_corners=True)
            if enabled
            else nn.Identity()
        )
        mapping = nn.Conv2d(c_in, c_out, kernel_size=1)
        self.blocks = nn.ModuleList([interp, mapping] if mode == "up" else [mapping, interp])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if autocast_on(x):
            for block in self.blocks:
                x = block(x.float())
            return x
        dtype = x.dtype
        for block in self.blocks:
            if isinstance(block, nn.Conv2d):
                x = F.conv2d(x.float(), block.weight.float(), block.bias.float())
            else:
                x = block(x.float())
        return x.to(dtype)


class CnetDeliverer:
    """Hands out ControlNet entries one per ResBlock call (docs/OFFICIAL.md, Stage C); None past the end."""

    def __init__(self, entries: Sequence[Optional[torch.Tensor]]):
        self.entries = list(entries)
        self.idx = 0

    def __call__(self) -> Optional[torch.Tensor]:
        out = self.entries[self.idx] if self.idx < len(self.entries) else None
        self.idx += 1
        return out


def _per_level(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} levels")
        return list(value)
    return [value] * n


class CascadeUNet(nn.Module):
    """Level construction and the down/up passes shared by StageB and StageC (§1.8-1.10).

    Subclasses register their own modules before/after calling :meth:`_build_levels` so that the
    state-dict order matches the official files. Per-block gradient checkpointing is switched by
    :meth:`set_gradient_checkpointing`.
    """

    gradient_checkpointing: bool = False
    #: period of the checkpointed blocks (:func:`checkpoint_every`), 0 = none
    checkpoint_period: int = 0

    def _build_levels(
        self,
        c_hidden: Sequence[int],
        c_cond: int,
        c_r: int,
        nhead: Sequence[int],
        blocks: Sequence[Sequence[int]],
        block_repeat: Sequence[Sequence[int]],
        level_config: Sequence[str],
        kernel_size: int,
        dropout,
        self_attn,
        t_conds: Sequence[str],
        make_down: Callable[[int], nn.Module],
        make_up: Callable[[int], nn.Module],
    ) -> None:
        n = len(c_hidden)
        for name, v in (("nhead", nhead), ("level_config", level_config), ("blocks[0]", blocks[0]),
                        ("blocks[1]", blocks[1]), ("block_repeat[0]", block_repeat[0]),
                        ("block_repeat[1]", block_repeat[1])):
            if len(v) != n:
                raise ValueError(f"{name} has {len(v)} entries but c_hidden has {n} levels")
        dropout = _per_level(dropout, n, "dropout")
        self_attn = _per_level(self_attn, n, "self_attn")

        def make_block(letter: str, i: int, c_skip: int = 0) -> nn.Module:
            if letter == "C":
                return ResBlock(c_hidden[i], c_skip, kernel_size=kernel_size, dropout=dropout[i])
            if letter == "A":
                return AttnBlock(c_hidden[i], c_cond, nhead[i], self_attn=self_attn[i], dropout=dropout[i])
            if letter == "F":
                return FeedForwardBlock(c_hidden[i], dropout=dropout[i])
            if letter == "T":
                return TimestepBlock(c_hidden[i], c_r, conds=t_conds)
            raise ValueError(f"unknown block letter {letter!r} in level_config {list(level_config)}")

        self.down_blocks = nn.ModuleList()
        self.down_downscalers = nn.ModuleList()
        self.down_repeat_mappers = nn.ModuleList()
        for i in range(n):
            self.down_downscalers.append(nn.Identity() if i == 0 else make_down(i))
            self.down_blocks.append(nn.ModuleList(
                make_block(letter, i) for _ in range(blocks[0][i]) for letter in level_config[i]))
            self.down_repeat_mappers.append(nn.ModuleList(
                nn.Conv2d(c_hidden[i], c_hidden[i], kernel_size=1) for _ in range(block_repeat[0][i] - 1)))

        self.up_blocks = nn.ModuleList()
        self.up_upscalers = nn.ModuleList()
        self.up_repeat_mappers = nn.ModuleList()
        up_counts, up_repeats = list(reversed(blocks[1])), list(reversed(block_repeat[1]))
        for i in reversed(range(n)):
            self.up_upscalers.append(make_up(i) if i > 0 else nn.Identity())
            level = nn.ModuleList()
            for k in range(up_counts[i]):
                for pos, letter in enumerate(level_config[i]):
                    c_skip = c_hidden[i] if (i < n - 1 and k == 0 and pos == 0) else 0
                    level.append(make_block(letter, i, c_skip))
            self.up_blocks.append(level)
            self.up_repeat_mappers.append(nn.ModuleList(
                nn.Conv2d(c_hidden[i], c_hidden[i], kernel_size=1) for _ in range(up_repeats[i] - 1)))

    def set_gradient_checkpointing(self, enabled: "bool | int") -> None:
        """Recompute blocks in backward (saves activation memory): ``True`` every block, an int N
        every N-th block (:func:`checkpointed_blocks`), ``False``/0 none."""
        every = checkpoint_every(enabled)
        self.gradient_checkpointing = every > 0
        self.checkpoint_period = every
        blocks = [m for m in self.modules() if isinstance(m, BLOCK_TYPES)]
        for block, on in zip(blocks, checkpointed_blocks(len(blocks), every)):
            block._recompute = on  # type: ignore[assignment]  # plain attribute: survives deepcopy (EMA)

    def _run(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and getattr(block, "_recompute", True) and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _apply_block(self, block: nn.Module, x, r_embed, clip, skip=None):
        if isinstance(block, ResBlock):
            return self._run(block, x, skip) if skip is not None else self._run(block, x)
        if isinstance(block, AttnBlock):
            return self._run(block, x, clip)
        if isinstance(block, TimestepBlock):
            return self._run(block, x, r_embed)
        return self._run(block, x)

    @staticmethod
    def _inject(x: torch.Tensor, cnet: Optional[CnetDeliverer]) -> torch.Tensor:
        if cnet is None:
            return x
        entry = cnet()
        if entry is None:
            return x
        return x + match_dtype(resize_ac(entry, x.shape[-2:]), x.dtype)

    def _down_encode(self, x, r_embed, clip, cnet: Optional[CnetDeliverer] = None) -> list:
        level_outputs = []
        for blocks, downscaler, repmap in zip(self.down_blocks, self.down_downscalers, self.down_repeat_mappers):
            x = downscaler(x)
            for p in range(len(repmap) + 1):
                for block in blocks:
                    if isinstance(block, ResBlock):
                        x = self._inject(x, cnet)
                    x = self._apply_block(block, x, r_embed, clip)
                if p < len(repmap):
                    x = repmap[p](x)
            level_outputs.insert(0, x)
        return level_outputs

    def _up_decode(self, level_outputs, r_embed, clip, cnet: Optional[CnetDeliverer] = None) -> torch.Tensor:
        x = level_outputs[0]
        for j, (blocks, upscaler, repmap) in enumerate(zip(self.up_blocks, self.up_upscalers, self.up_repeat_mappers)):
            for p in range(len(repmap) + 1):
                for k, block in enumerate(blocks):
                    skip = None
                    if isinstance(block, ResBlock):
                        skip = level_outputs[j] if (k == 0 and j > 0) else None
                        if skip is not None and x.shape[-2:] != skip.shape[-2:]:
                            x = match_dtype(resize_ac(x.float(), skip.shape[-2:]), x.dtype)
                        x = self._inject(x, cnet)
                    x = self._apply_block(block, x, r_embed, clip, skip)
                if p < len(repmap):
                    x = repmap[p](x)
            x = upscaler(x)
        return x

    def _r_embed(self, r: torch.Tensor, dtype: torch.dtype, kwargs: dict) -> torch.Tensor:
        """r embedding followed by one embedding per ``t_conds`` entry (zeros when not given)."""
        embs = [gen_r_embedding(r, self.c_r)]
        for name in self.t_conds:
            t = kwargs.get(name)
            embs.append(gen_r_embedding(torch.zeros_like(r) if t is None else t, self.c_r))
        return match_dtype(torch.cat(embs, dim=1), dtype)

    def _build_embedding(self, c_in: int, patch_size: int, c_hidden0: int) -> nn.Sequential:
        """The input embedding: PixelUnshuffle, 1x1 conv to ``c_hidden0``, LayerNorm."""
        return nn.Sequential(
            nn.PixelUnshuffle(patch_size),
            nn.Conv2d(c_in * patch_size**2, c_hidden0, kernel_size=1),
            LayerNorm2d(c_hidden0, elementwise_affine=False, eps=1e-6),
        )

    def _finish_build(self, c_hidden0: int, c_out: int, patch_size: int, gradient_checkpointing: bool) -> None:
        """After the levels: the output head ``clf`` (LayerNorm, 1x1 conv to ``c_out * patch_size**2``,
        PixelShuffle), then the subclass's ``_init_weights`` and the checkpointing switch."""
        self.clf = nn.Sequential(
            LayerNorm2d(c_hidden0, elementwise_affine=False, eps=1e-6),
            nn.Conv2d(c_hidden0, c_out * patch_size**2, kernel_size=1),
            nn.PixelShuffle(patch_size),
        )
        self._init_weights()
        self.set_gradient_checkpointing(gradient_checkpointing)

    def _working_dtype(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        """``(x, dtype)`` of the forward: the input's dtype under autocast (the official path);
        otherwise the weights' (a bf16-stored model, e.g. master-free training or inference, takes
        float32 inputs), ``x`` cast to it."""
        if torch.is_autocast_enabled(x.device.type):
            return x, x.dtype
        dtype = self.embedding[1].weight.dtype
        return x.to(dtype), dtype

    def _init_common(self, n_down_blocks: int) -> None:
        """The official init rules Stage B and C share, after their condition mappers': input
        embedding xavier with gain 0.02, zero output conv, residual scaling, zero TimestepBlock
        linears (docs/OFFICIAL.md, Stage C)."""
        nn.init.xavier_uniform_(self.embedding[1].weight, 0.02)
        nn.init.constant_(self.clf[1].weight, 0)
        scale = math.sqrt(1 / n_down_blocks)
        for level in list(self.down_blocks) + list(self.up_blocks):
            for block in level:
                if isinstance(block, (ResBlock, FeedForwardBlock)):
                    block.channelwise[-1].weight.data *= scale
                elif isinstance(block, TimestepBlock):
                    for layer in block.modules():
                        if isinstance(layer, nn.Linear):
                            nn.init.constant_(layer.weight, 0)

    @staticmethod
    def _xavier(m: nn.Module) -> None:
        # Rule 1: Conv2d/Linear (incl. MHA out_proj) xavier + zero bias; ConvTranspose2d untouched.
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    @torch.no_grad()
    def update_weights_ema(self, src_model: nn.Module, beta: float = 0.999) -> None:
        """self <- self*beta + src*(1-beta) over parameters and buffers in iteration order."""
        for p_self, p_src in zip(self.parameters(), src_model.parameters()):
            p_self.lerp_(p_src.detach().to(p_self.device, p_self.dtype), 1 - beta)
        for b_self, b_src in zip(self.buffers(), src_model.buffers()):
            if b_self.is_floating_point():
                b_self.lerp_(b_src.to(b_self.device, b_self.dtype), 1 - beta)
            else:  # integer counters cannot be averaged
                b_self.copy_(b_src)
