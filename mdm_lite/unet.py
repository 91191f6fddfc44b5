"""A single-resolution, text-conditioned UNet: the building block that MDM nests (chapter 3).

The layout follows the ADM UNet of Dhariwal & Nichol (2021), used by MDM (Gu et al. 2023, Sec. 3.2):
residual blocks conditioned on the time embedding through a scale and shift of the normalised
features, self-attention at low resolutions, and cross-attention to the text tokens (Imagen,
Saharia et al. 2022). The pooled text is added to the time embedding, as in the MDM reference code.

Calls follow diffusers: ``model(sample, timestep, encoder_hidden_states, encoder_attention_mask)``.
Inside, `UNet.encode` runs the contracting path, `UNet.middle` the bottleneck and `UNet.decode` the
expanding path; a NestedUNet (chapter 4) calls them to put another UNet where the middle would be.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config_check import ConfigError, NonEmpty, NonNegative, OneOf, Positive, Range, Rule, check_fields
from .text import masked_mean

Even = Rule(lambda n: n % 2 == 0, "even", hint="the time embedding splits the channels into cos and sin halves")


@dataclass
class UNetConfig:
    """Hyper-parameters of one UNet.

    Attributes:
        resolution: side of the square input image.
        channels: width at full resolution; level i has channels * channel_mult[i] and works at
            resolution / 2**i.
        attention_resolutions: image sides at which blocks get self- and cross-attention.
        text_dim: width of the text encoder's tokens (0: an unconditional model).
        emb_dim: width of the time embedding (default 4 * channels).
        middle: whether the bottleneck has its own blocks; a NestedUNet shell has none, the inner
            UNet sits there instead.
        position_embedding: tell every pixel where it is: a fixed 2D sinusoidal embedding of its
            row and column (`position_embedding`), projected by a learnt 1x1 conv, is added after
            the input conv, and the same embedding is added to the inputs of every attention block.
            Convolutions and attention are blind to absolute position except through the zero
            padding at the border, and near t = 1 the input is noise: where "top left" is must come
            from somewhere.
        downsample: "pool" (2x2 average pooling then a 3x3 conv, aligned with the image pyramid;
            see `Downsample`) or "stride" (a stride-2 3x3 conv, off the pyramid's grid by half a
            pixel; checkpoints saved before this option existed use it, and load with it).
    """

    resolution: Annotated[int, Positive] = 32
    in_channels: Annotated[int, Positive] = 3
    out_channels: Annotated[int, Positive] = 3
    channels: Annotated[int, Positive, Even] = 64
    channel_mult: Annotated[tuple[Annotated[int, Positive], ...], NonEmpty] = (1, 2, 2)
    num_res_blocks: Annotated[int, NonNegative] = 2
    attention_resolutions: tuple[Annotated[int, Positive], ...] = (16, 8)
    head_dim: Annotated[int, Positive] = 32
    dropout: Annotated[float, Range(0, 1, high_open=True)] = 0.0
    text_dim: Annotated[int, NonNegative] = 384
    emb_dim: Annotated[int, Positive] | None = None
    middle: bool = True
    position_embedding: bool = False
    downsample: Annotated[str, OneOf("pool", "stride")] = "pool"

    def __post_init__(self):
        check_fields(self)
        if self.emb_dim is None:
            self.emb_dim = 4 * self.channels
        if self.resolution % 2 ** (len(self.channel_mult) - 1):
            raise ConfigError(f"{list(self.channel_mult)} halves the {self.resolution}px resolution "
                              f"{len(self.channel_mult) - 1} times, which does not divide it: use fewer entries",
                              "channel_mult")

    @property
    def level_resolutions(self) -> list[int]:
        """Image side at each level of the UNet, full resolution first."""
        return [self.resolution >> i for i in range(len(self.channel_mult))]

    def check_attention(self) -> None:
        """Raise ConfigError unless attention_resolutions is empty (no attention) or names at least
        one level, and every attention block's width splits into heads of head_dim channels. A
        NestedUNetConfig calls it once its inner resolution is set, as does UNet."""
        levels = self.level_resolutions
        if self.attention_resolutions and not set(self.attention_resolutions) & set(levels):
            raise ConfigError(
                f"{list(self.attention_resolutions)} select no level of this {self.resolution}px UNet (its levels: "
                f"{', '.join(map(str, levels))}), so it would have no attention and no cross-attention to the "
                "text: list some of its levels (sizes in pixels), or change the image size or number of levels so that "
                "it has one", "attention_resolutions")
        for size, mult in zip(levels, self.channel_mult):
            width = self.channels * mult
            if size in self.attention_resolutions and width % max(1, width // self.head_dim):
                raise ConfigError(f"{self.head_dim} does not split the {width} channels of the {size}px attention "
                                  f"into equal heads: use a head_dim that divides {width}", "head_dim")


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of continuous times (Vaswani et al. 2017; DDPM Sec. 4).

    t: (B,) in [0, 1], scaled by 1000 so the frequencies match a 1000-step discrete model.
    Returns (B, dim).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def position_embedding(height: int, width: int, dim: int) -> Tensor:
    """2D sinusoidal embedding of pixel positions (Vaswani et al. 2017, in ViT's 2D form).

    The first dim/2 channels embed the row index, the rest the column index, with the time
    embedding's frequencies. Returns (dim, height * width), row-major like a flattened (C, H, W) map.
    """
    rows = timestep_embedding(torch.arange(height) / 1000.0, dim // 2)  # (H, dim/2); t*1000 = index
    cols = timestep_embedding(torch.arange(width) / 1000.0, dim - dim // 2)  # (W, dim - dim/2)
    grid = torch.cat([rows[:, None].expand(-1, width, -1), cols[None].expand(height, -1, -1)], dim=-1)
    return grid.reshape(height * width, dim).T.contiguous()


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so that a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (the same parameters, so checkpoints load unchanged) that steps around one slow
    kernel of torch on the CPU.

    For a channels-last map of fewer than 1,024 pixels (its `feature_map_threshold`) torch's CPU
    kernel gives each (image, group) one thread, which reads that group's channels strided across
    the map; in bf16 that is 3 to 23 times slower than normalising the same map channels-first
    (batch 8-32, 16-192 channels, 8x8 and 16x16; fp16 3-5x), while larger maps take a fast path.
    Sampling runs channels-last on the CPU (`samplers._noise`), so under bf16 such maps (the 16x16
    and 8x8 levels) are normalised channels-first and handed back channels-last: the same
    function, to rounding. In fp32 torch's kernel is as fast either way, and training is
    channels-first: both go straight through.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 4
                and x.shape[-2] * x.shape[-1] < 1024 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def norm(channels: int) -> GroupNorm:
    """GroupNorm with up to 32 groups that divide the channel count."""
    return GroupNorm(math.gcd(32, channels), channels)


class Conditioning(nn.Module):
    """The vector every residual block is conditioned on: time embedding + projected pooled text.

    MDM (reference code) adds a linear map of the masked mean of the text tokens to the time
    embedding; the tokens themselves go to cross-attention untouched.
    """

    def __init__(self, channels: int, emb_dim: int, text_dim: int):
        super().__init__()
        self.channels = channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.text_proj = nn.Linear(text_dim, emb_dim) if text_dim else None

    def forward(self, timestep: Tensor, tokens: Tensor | None, mask: Tensor | None) -> Tensor:
        """timestep: (B,) in [0, 1]; tokens: (B, L, text_dim) or None; mask: (B, L) bool. Returns (B, emb_dim)."""
        emb = self.time_mlp(timestep_embedding(timestep, self.channels))
        if self.text_proj is not None and tokens is not None:
            emb = emb + self.text_proj(masked_mean(tokens, mask))
        return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding as a scale and shift after the second norm (ADM)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, in_ch, H, W); emb: (B, emb_dim). Returns (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)  # norm(h) (1 + scale) + shift, one kernel
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the pixels, then cross-attention from the pixels to the text tokens.

    Padding tokens are masked out of the cross-attention: a short caption padded to the batch's
    longest must mean the same as the caption alone. With `position_size` (the side of the square
    feature map), the 2D embedding of `position_embedding` is added to the normalised pixels that
    make the queries, keys and values, so a pixel can attend to "top left" in the caption according
    to where it is.

    Inside, the pixels are a sequence (B, H*W, C) with channels last, the layout torch's fused
    attention kernel takes (a (B, C, N) layout made it fall back to the unfused one, 1.7x slower for
    the block at 16x16 on the CPU); the projections keep their 1x1 Conv1d parameters (`_pointwise`).
    """

    def __init__(self, channels: int, head_dim: int, text_dim: int, position_size: int | None = None):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        if position_size is not None:  # (size * size, C), built once, not saved
            self.register_buffer("pos", position_embedding(position_size, position_size, channels).T.contiguous(),
                                 persistent=False)
        else:
            self.pos = None
        self.norm = norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.out = zero_module(nn.Conv1d(channels, channels, 1))
        self.cross_attention = text_dim > 0  # an unconditional model (text_dim 0) has none
        if self.cross_attention:
            self.cross_norm = norm(channels)
            self.cross_q = nn.Conv1d(channels, channels, 1)
            self.cross_kv = nn.Linear(text_dim, 2 * channels)
            self.cross_out = zero_module(nn.Conv1d(channels, channels, 1))

    def _heads(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, heads, N, C / heads)"""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, tokens: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); tokens: (B, L, text_dim) or None; mask: (B, L) bool. Returns (B, C, H, W)."""
        b, c, h, w = x.shape
        pos = 0.0 if self.pos is None else self.pos.to(x.dtype)
        seq = x.flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = _pointwise(self.qkv, self.norm(x).flatten(2).transpose(1, 2) + pos).chunk(3, dim=-1)
        seq = seq + _pointwise(self.out, _merge_heads(attention(self._heads(q), self._heads(k), self._heads(v))))
        if tokens is not None and self.cross_attention:
            normed = self.cross_norm(seq.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
            k, v = self.cross_kv(tokens).chunk(2, dim=-1)
            attn_mask = None if mask is None else mask[:, None, None, :]
            q = self._heads(_pointwise(self.cross_q, normed + pos))
            a = attention(q, self._heads(k), self._heads(v), attn_mask)
            seq = seq + _pointwise(self.cross_out, _merge_heads(a))
        return seq.transpose(1, 2).reshape(b, c, h, w)


def _pointwise(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """A 1x1 Conv1d's map applied to a sequence: x (B, N, C_in) -> (B, N, C_out)."""
    return F.linear(x, conv.weight.squeeze(-1), conv.bias)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, heads, N, D) -> (B, N, heads * D)"""
    return x.transpose(1, 2).flatten(2)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D)) v (Vaswani et al. 2017) by torch's fused kernel: q (B, heads, N, D),
    k and v (B, heads, L, D), attn_mask (B, 1, 1, L) bool (False: ignore that key) or None.

    On the CPU it runs in fp32 under bf16 autocast too: there the fused kernel's bf16 backward
    is the slower one (fwd + bwd of the cpu preset's blocks at batch 16, one thread: 15.4 against
    23.2 ms at 16x16, 7.3 against 22.3 at 8x8).
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    dtype = torch.promote_types(q.dtype, torch.float32)  # bf16 -> fp32; fp32 and fp64 unchanged
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=attn_mask).to(q.dtype)


class Downsample(nn.Module):
    """Halve the resolution: 2x2 average pooling, then a 3x3 conv (`stride=False`, the default).

    Pixel j of the result covers input pixels 2j and 2j + 1, exactly as the average-pooled image
    pyramid of MDM's loss (Sec. 3.1), so a shell's bottleneck lines up with the inner level's image
    and with `Upsample`'s nearest-neighbour copy back to 2j and 2j + 1. The usual stride-2 3x3 conv
    (`stride=True`, kept for checkpoints trained with it) centres pixel j on input 2j instead: half
    a pixel towards the top left, and its last output row sees no padding while its first does.
    That left the 64x64 level with noisy bottom rows and left columns; the pooled layout is the same
    under a mirror flip (tests/test_models.py). Both have the same parameters.
    """

    def __init__(self, channels: int, stride: bool = False):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels, 3, stride=2 if stride else 1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x if self.stride else F.avg_pool2d(x, 2))


class Upsample(nn.Module):
    """Double the resolution: a nearest-neighbour copy, then a 3x3 conv (ADM).

    Computed as the one stride-2 4x4 transposed conv that equals the pair (the "resize-conv"
    identity; tests/test_models.py checks it): it reads the low-resolution input directly, 16
    multiply-adds per input pixel against the 36 of a 3x3 conv over the 4x larger copy, and makes
    no copy. The parameters stay those of the 3x3 conv, so checkpoints are unchanged.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, 2H, 2W)."""
        kernel = _resize_taps(_resize_taps(self.conv.weight, 2), 3).transpose(0, 1)  # (C_in, C_out, 4, 4)
        return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)


def _resize_taps(weight: Tensor, dim: int) -> Tensor:
    """The 3 taps (-1, 0, +1) of a conv after a nearest x2 copy, along `dim`, as the 4 taps of a
    stride-2 transposed conv (padding 1): output pixel 2i reads x[i-1], x[i], x[i] of the copy, so
    gets taps 3 and 1 (= w[-1], w[0] + w[+1]); pixel 2i + 1 reads x[i], x[i], x[i+1], taps 2 and 0
    (= w[-1] + w[0], w[+1]). Sums in the weights' dtype (fp32 under autocast too)."""
    before, centre, after = weight.unbind(dim)
    return torch.stack([after, centre + after, before + centre, before], dim)


class Stage(nn.Module):
    """A residual block, optionally followed by self- and cross-attention."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, resolution: int):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, cfg.emb_dim, cfg.dropout)
        use_attn = resolution in cfg.attention_resolutions
        position_size = resolution if cfg.position_embedding else None
        self.attn = AttentionBlock(out_ch, cfg.head_dim, cfg.text_dim, position_size) if use_attn else None

    def forward(self, x: Tensor, emb: Tensor, tokens: Tensor | None, mask: Tensor | None) -> Tensor:
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x, tokens, mask)


class UNet(nn.Module):
    """A text-conditioned UNet at one resolution.

    Forward: sample (B, in_channels, R, R) noisy image, timestep (B,) in [0, 1] (or a scalar),
    encoder_hidden_states (B, L, text_dim) text tokens or None, encoder_attention_mask (B, L) bool
    -> (B, out_channels, R, R), the prediction (v or eps, see `mdm_lite.diffusion`).

    The forward pass in its parts, given the conditioning vector `emb` (`condition`):
    `encode` (input conv, contracting path), `middle` (the bottleneck blocks) and `decode`
    (expanding path, output conv); `denoise` runs the three. A NestedUNet's shell has no middle
    blocks and runs its inner levels between its `encode` and `decode` instead (Gu et al. 2023,
    Sec. 3.2).
    """

    def __init__(self, config: UNetConfig, with_conditioning: bool = True):
        super().__init__()
        config.check_attention()
        self.config = cfg = config
        chans = [cfg.channels * m for m in cfg.channel_mult]
        self.conditioning = Conditioning(cfg.channels, cfg.emb_dim, cfg.text_dim) if with_conditioning else None
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        if cfg.position_embedding:  # (1, 32, R, R), rebuilt on load rather than saved
            table = position_embedding(cfg.resolution, cfg.resolution, 32)
            self.register_buffer("pos_table", table.reshape(1, 32, cfg.resolution, cfg.resolution), persistent=False)
            self.pos_proj = nn.Conv2d(32, chans[0], 1)

        self.down = nn.ModuleList()
        skip_chans, ch, res = [chans[0]], chans[0], cfg.resolution
        for level, out_ch in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Stage(ch, out_ch, cfg, res))
                ch = out_ch
                skip_chans.append(ch)
            if level < len(chans) - 1:
                self.down.append(Downsample(ch, stride=cfg.downsample == "stride"))
                skip_chans.append(ch)
                res //= 2
        self.bottleneck_channels = ch
        # The middle: a block with attention, then a plain residual block (ADM); none in a shell.
        self.mid = nn.ModuleList([Stage(ch, ch, cfg, res), ResBlock(ch, ch, cfg.emb_dim, cfg.dropout)]) if cfg.middle else None

        self.up = nn.ModuleList()
        for level, out_ch in reversed(list(enumerate(chans))):
            for i in range(cfg.num_res_blocks + 1):
                self.up.append(Stage(ch + skip_chans.pop(), out_ch, cfg, res))
                ch = out_ch
            if level > 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.out_channels = ch
        self.norm_out = norm(ch)
        self.conv_out = zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def condition(self, timestep: Tensor, tokens: Tensor | None, mask: Tensor | None) -> Tensor:
        """The conditioning vector (B, emb_dim) of every residual block: see `Conditioning`."""
        return self.conditioning(timestep, tokens, mask)

    def encode(self, x: Tensor, emb: Tensor, tokens: Tensor | None = None, mask: Tensor | None = None,
               inject: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Input conv, then the contracting path. x: (B, in_channels, R, R); emb: (B, emb_dim);
        inject: features (B, channels, R, R) added after the input conv (a NestedUNet's `to_inner`),
        or None. Returns the bottleneck features (B, bottleneck_channels, R / 2^(levels - 1), ...)
        and the skips, one per layer, for `decode`."""
        h = self.conv_in(x)
        if self.config.position_embedding:
            h = h + self.pos_proj(self.pos_table)
        if inject is not None:
            h = h + inject
        skips = [h]
        for layer in self.down:
            h = layer(h, emb, tokens, mask) if isinstance(layer, Stage) else layer(h)
            skips.append(h)
        return h, skips

    def middle(self, h: Tensor, emb: Tensor, tokens: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """The bottleneck blocks; the identity for a UNet built with middle=False (a shell)."""
        if self.mid is None:
            return h
        attention_block, res_block = self.mid
        return res_block(attention_block(h, emb, tokens, mask), emb)

    def decode(self, h: Tensor, skips: list[Tensor], emb: Tensor, tokens: Tensor | None = None,
               mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The expanding path, each block reading the skip of its resolution, then the output conv.
        Returns (prediction (B, out_channels, R, R), last features (B, channels, R, R)); it uses
        up `skips`."""
        for layer in self.up:
            if isinstance(layer, Stage):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb, tokens, mask)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h))), h

    def denoise(self, x: Tensor, emb: Tensor, tokens: Tensor | None = None, mask: Tensor | None = None,
                inject: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """encode -> middle -> decode: (prediction, last features), as `decode` returns them."""
        h, skips = self.encode(x, emb, tokens, mask, inject)
        return self.decode(self.middle(h, emb, tokens, mask), skips, emb, tokens, mask)

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor | None = None,
                encoder_attention_mask: Tensor | None = None) -> Tensor:
        timestep = batch_timesteps(timestep, sample.shape[0], sample.device)
        emb = self.condition(timestep, encoder_hidden_states, encoder_attention_mask)
        return self.denoise(sample, emb, encoder_hidden_states, encoder_attention_mask)[0]


def batch_timesteps(timestep: Tensor | float, batch: int, device) -> Tensor:
    """Accept a Python number, a 0-d tensor or a (B,) tensor of times in [0, 1]; return (B,) float32."""
    t = torch.as_tensor(timestep, dtype=torch.float32, device=device)
    return t.expand(batch) if t.ndim == 0 else t
