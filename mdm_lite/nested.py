"""NestedUNet: one network that denoises every resolution at once (MDM, Gu et al. 2023, Sec. 3.2;
chapter 4 builds it).

A NestedUNet with L levels is a light convolutional *shell* UNet at the full resolution R whose
bottleneck, at R/2, holds a NestedUNet with L - 1 levels; a one-level NestedUNet is a plain UNet.
The inner network reads its own noisy low-resolution image through its input conv, and the two
talk through two zero-initialised 3x3 convs::

    outer bottleneck features --to_inner-->  added after the inner input conv
    inner last features      --from_inner--> added to the outer bottleneck

Since both joins (and every output conv) start at zero, wrapping a trained low-resolution model
in a new shell leaves its predictions unchanged: progressive training (Sec. 3.4) resumes exactly
where the smaller model stopped. Attention lives only in the innermost UNet, where pixels are few;
the high-resolution shells are cheap.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config_check import ConfigError, NonNegative, OneOf, Positive, check_fields
from .unet import UNet, UNetConfig, batch_timesteps, zero_module


@dataclass
class NestedUNetConfig:
    """Hyper-parameters of a NestedUNet.

    Attributes:
        image_size: side of the largest image; level k (0 = outermost) works at image_size / 2**k.
        num_levels: 1 (a plain UNet at image_size), 2 (64 with 32 nested), 3 (64, 32, 16), ...
        inner: the innermost UNet; its `resolution` is set to image_size / 2**(num_levels - 1).
        shell_channels, shell_num_res_blocks: each shell is a UNet with channel_mult (1, 2), no
            attention and no middle blocks, so it halves the resolution exactly once.
        outer_patch: 1, or 2: the outermost shell reads and writes 2x2 blocks of pixels as 12
            channels (space-to-depth, the "patching" of Simple Diffusion, Hoogeboom et al. 2023,
            which keeps high-resolution feature maps out of the network), so it works at half the
            resolution from its input conv on, with twice the channels (2 * shell_channels) and
            channel_mult (1,): no down- or upsampling, its bottleneck at the inner level's side.
            The inner shells are unchanged.
    """

    image_size: Annotated[int, Positive] = 64
    num_levels: Annotated[int, Positive] = 2
    inner: UNetConfig = field(default_factory=UNetConfig)
    shell_channels: Annotated[int, Positive] = 32
    shell_num_res_blocks: Annotated[int, NonNegative] = 1
    outer_patch: Annotated[int, OneOf(1, 2)] = 1

    def __post_init__(self):
        check_fields(self)
        if self.image_size % 2 ** (self.num_levels - 1):
            raise ConfigError(f"{self.image_size} cannot be halved {self.num_levels - 1} times for {self.num_levels} "
                              f"levels: use an image_size divisible by {2 ** (self.num_levels - 1)}, or fewer levels",
                              "image_size")
        try:
            self.inner = dataclasses.replace(self.inner, resolution=self.resolutions[-1])
            self.inner.check_attention()
        except ConfigError as error:
            raise error.within("inner") from None

    @property
    def resolutions(self) -> list[int]:
        """Image side per level, outermost first: e.g. [64, 32] for two levels."""
        return [self.image_size >> k for k in range(self.num_levels)]

    def inner_levels(self) -> "NestedUNetConfig":
        """The config of the NestedUNet nested inside this one's outermost shell."""
        return dataclasses.replace(self, image_size=self.image_size // 2, num_levels=self.num_levels - 1,
                                   outer_patch=1)

    def same_network(self, other: "NestedUNetConfig") -> bool:
        """Whether `other` builds the same network. A one-level model has no shell, so its
        shell_channels, shell_num_res_blocks and outer_patch are ignored: its checkpoints grow into,
        and resume as, a model of any shell (a recipe's first stages are one-level runs)."""
        if self.num_levels == 1 == other.num_levels:
            return (self.image_size, self.inner) == (other.image_size, other.inner)
        return self == other

    def shell(self) -> UNetConfig:
        p = self.outer_patch
        return UNetConfig(
            resolution=self.image_size // p, in_channels=self.inner.in_channels * p * p,
            out_channels=self.inner.out_channels * p * p, channels=self.shell_channels * p,
            channel_mult=(1, 2) if p == 1 else (1,), num_res_blocks=self.shell_num_res_blocks,
            attention_resolutions=(), head_dim=self.inner.head_dim, dropout=self.inner.dropout,
            text_dim=self.inner.text_dim, emb_dim=self.inner.emb_dim, middle=False, downsample=self.inner.downsample,
        )


class NestedUNet(nn.Module):
    """Denoise a pyramid of noisy images jointly.

    Forward: sample, a list of num_levels tensors (B, 3, R_k, R_k), outermost (largest) first;
    timestep (B,) in [0, 1], shared by all levels (MDM, Eq. 4); encoder_hidden_states (B, L, D)
    and encoder_attention_mask (B, L) bool. Returns a list of predictions with the same shapes.
    """

    def __init__(self, config: NestedUNetConfig):
        super().__init__()
        self.config = config
        if config.num_levels == 1:
            self.inner = UNet(config.inner)
            self.shell = None
            return
        self.inner = NestedUNet(config.inner_levels())
        self.shell = UNet(config.shell(), with_conditioning=False)
        self.to_inner = zero_module(nn.Conv2d(self.shell.bottleneck_channels, self.inner.input_channels, 3, padding=1))
        self.from_inner = zero_module(nn.Conv2d(self.inner.output_channels, self.shell.bottleneck_channels, 3, padding=1))

    @property
    def input_channels(self) -> int:
        """Width of the features right after the input conv of the outermost level."""
        net = self.shell or self.inner
        return net.conv_in.out_channels

    @property
    def output_channels(self) -> int:
        """Width of the last features of the outermost level (before its output conv)."""
        return (self.shell or self.inner).out_channels

    @property
    def innermost(self) -> UNet:
        return self.inner if self.shell is None else self.inner.innermost

    def condition(self, timestep: Tensor, tokens: Tensor | None, mask: Tensor | None) -> Tensor:
        """The conditioning vector, computed once by the innermost UNet and shared by every level."""
        return self.innermost.condition(timestep, tokens, mask)

    def denoise(self, zs: list[Tensor], emb: Tensor, tokens: Tensor | None = None, mask: Tensor | None = None,
                inject: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """Predictions for every level, outermost first, and the outermost level's last features.

        zs: num_levels noisy images, outermost first; emb: (B, emb_dim) from `condition`; inject:
        features added after the outermost input conv (from the level around this one), or None.
        """
        if self.shell is None:  # one level: a plain UNet
            prediction, features = self.inner.denoise(zs[0], emb, tokens, mask, inject)
            return [prediction], features
        # One level of the paper's Fig. 2 (Gu et al. 2023, Sec. 3.2):
        # 1. shell encode: the outer noisy image z^R, down to features at R/2
        patch = self.config.outer_patch  # 2: the shell sees 2x2 blocks of pixels as channels
        h, skips = self.shell.encode(zs[0] if patch == 1 else F.pixel_unshuffle(zs[0], patch), emb, inject=inject)
        # 2. to_inner: those features, for the inner levels (added after their input conv)
        inner_inject = self.to_inner(h)
        # 3. the inner levels, each on its own noisy image z^(R/2), z^(R/4), ...
        inner_predictions, inner_features = self.inner.denoise(zs[1:], emb, tokens, mask, inner_inject)
        # 4. from_inner: the inner levels' last features, added back at the shell's bottleneck
        h = h + self.from_inner(inner_features)
        # 5. shell decode: back up to R, the outer prediction
        prediction, features = self.shell.decode(h, skips, emb)
        prediction = prediction if patch == 1 else F.pixel_shuffle(prediction, patch)
        return [prediction] + inner_predictions, features

    def forward(self, sample: list[Tensor], timestep: Tensor, encoder_hidden_states: Tensor | None = None,
                encoder_attention_mask: Tensor | None = None) -> list[Tensor]:
        if len(sample) != self.config.num_levels:
            raise ValueError(f"expected {self.config.num_levels} images (one per level), got {len(sample)}")
        timestep = batch_timesteps(timestep, sample[0].shape[0], sample[0].device)
        emb = self.condition(timestep, encoder_hidden_states, encoder_attention_mask)
        return self.denoise(list(sample), emb, encoder_hidden_states, encoder_attention_mask)[0]

    @torch.no_grad()
    def gives_finite_outputs(self) -> bool:
        """Whether every weight is finite and a fixed random input (every level, t = 0.5, random
        text tokens) gives outputs whose mean square, the scale of the training loss, is finite.
        Weights can all be finite and still so large that the loss overflows: a step at lr 1e30
        leaves weights of 1e30 and outputs of 1e31. Uses no global RNG."""
        if not all(torch.isfinite(p).all() for p in self.parameters()):
            return False
        device, generator = next(self.parameters()).device, torch.Generator().manual_seed(0)
        xs = [torch.randn(1, self.config.inner.in_channels, r, r, generator=generator).to(device)
              for r in self.config.resolutions]
        text_dim = self.config.inner.text_dim
        tokens = torch.randn(1, 4, text_dim, generator=generator).to(device) if text_dim else None
        training = self.training
        try:
            outs = self.eval()(xs, torch.full((1,), 0.5, device=device), tokens, None)
        finally:
            self.train(training)
        return all(torch.isfinite(o.float().square().mean()) for o in outs)

    def level_parameters(self) -> list[int]:
        """Number of parameters that belong to each level, outermost first (joins count with their shell)."""
        if self.shell is None:
            return [sum(p.numel() for p in self.parameters())]
        inner = self.inner.level_parameters()
        return [sum(p.numel() for p in self.parameters()) - sum(inner)] + inner

    @classmethod
    def wrap(cls, inner: "NestedUNet", config: NestedUNetConfig) -> "NestedUNet":
        """A NestedUNet with one more level around a (trained) `inner` one: progressive training.

        `config` must describe the larger model; its inner levels must match `inner.config`.
        The new joins and output conv are zero, so the inner levels' predictions are unchanged.
        """
        if config.num_levels != inner.config.num_levels + 1 or not config.inner_levels().same_network(inner.config):
            raise ValueError(
                f"cannot wrap a {inner.config.num_levels}-level model at {inner.config.image_size}px in "
                f"a {config.num_levels}-level one at {config.image_size}px: their inner configs differ"
            )
        model = cls(config)
        model.inner.load_state_dict(inner.state_dict())
        return model
