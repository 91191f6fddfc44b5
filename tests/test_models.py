"""UNet and NestedUNet: shapes, equivalences, how the levels are wired, and that they can learn."""

import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F

from mdm_lite import DiffusionConfig, NestedUNet, NestedUNetConfig, ShapesDataset, UNet, UNetConfig, multires_loss
from mdm_lite.config_check import ConfigError
from mdm_lite.unet import AttentionBlock, Upsample, norm, position_embedding

torch.set_num_threads(1)

TEXT_DIM = 16


def tiny_unet_config(**overrides) -> UNetConfig:
    """About 50k parameters, every block type kept: self- and cross-attention run at 8x8."""
    config = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), head_dim=4,
                  text_dim=TEXT_DIM)
    return UNetConfig(**{**config, **overrides})


def tiny_nested_config(image_size: int, num_levels: int) -> NestedUNetConfig:
    """Attention at the inner UNet's second level: half its side (image_size >> (num_levels - 1))."""
    inner = tiny_unet_config(attention_resolutions=(image_size >> num_levels,))
    return NestedUNetConfig(image_size=image_size, num_levels=num_levels, inner=inner, shell_channels=8,
                            shell_num_res_blocks=1)


def perturbed(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter, so that no zero-initialised layer hides the ones behind it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def text(batch: int, length: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, TEXT_DIM, generator=g), torch.ones(batch, length, dtype=torch.bool)


def noisy_pyramid(resolutions, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, r, r, generator=g) for r in resolutions]


# --- UNet -----------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_unet_output_has_the_input_shape(resolution):
    model = UNet(tiny_unet_config(resolution=resolution, attention_resolutions=(resolution // 2,)))
    x = torch.randn(2, 3, resolution, resolution)
    assert model(x, torch.rand(2), *text(2)).shape == x.shape


def test_upsample_is_a_nearest_copy_then_its_3x3_conv():
    """`Upsample` runs as one stride-2 transposed conv; it must equal what its parameters mean, exactly
    (float64), and give the same gradients to them, on non-square maps so rows and columns both count."""
    upsample = Upsample(5).double()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    reference = upsample.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    out = upsample(x)
    assert out.shape == (2, 5, 6, 8)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, *upsample.parameters()], grad)
    theirs = torch.autograd.grad(reference, [x, *upsample.parameters()], grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("side, routed", [(16, True), (32, False)])
def test_group_norm_on_small_channels_last_bf16_maps_is_the_same_norm(side, routed):
    """Under bf16 a channels-last map under 32x32 is normalised channels-first (torch's channels-last
    kernel is slow there) and handed back channels-last; it must be GroupNorm's function all the same,
    outputs and gradients, to bf16 rounding, with the layout it came in."""
    norm_layer = norm(48)
    with torch.no_grad():
        norm_layer.weight.normal_(1, 0.2)
        norm_layer.bias.normal_(0, 0.2)
    x = (torch.randn(2, 48, side, side) * 2 + 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = norm_layer(x)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    x32 = x.detach().float().requires_grad_()
    reference = F.group_norm(x32, 16, norm_layer.weight, norm_layer.bias)
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=0.05)
    grad = torch.randn_like(reference)
    (gx,) = torch.autograd.grad(out, x, grad.to(torch.bfloat16))
    (rx,) = torch.autograd.grad(reference, x32, grad)
    torch.testing.assert_close(gx.float(), rx, rtol=0, atol=0.1)
    with torch.no_grad():  # which of torch's kernels computed it: channels-first when routed, else its own
        expected = torch.nn.GroupNorm.forward(norm_layer, x.contiguous() if routed else x)
    assert torch.equal(out.detach(), expected)


def test_attention_block_is_multi_head_attention_written_out():
    """AttentionBlock against the textbook formula, in float64, from its own parameters: heads of
    consecutive channels, positions added to the normalised pixels, padding tokens masked out."""
    block = perturbed(AttentionBlock(8, head_dim=4, text_dim=6, position_size=3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 3, 3, generator=g, dtype=torch.float64)
    tokens = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])

    def project(conv, seq):  # a 1x1 Conv1d on (B, N, C)
        return seq @ conv.weight[..., 0].T + conv.bias

    def heads(t):  # (B, N, 8) -> (B, 2, N, 4): channels 0-3 are head 0
        return t.reshape(t.shape[0], t.shape[1], 2, 4).transpose(1, 2)

    def attend(q, k, v, keep):
        scores = heads(q) @ heads(k).transpose(-1, -2) / 2.0  # sqrt(4)
        weights = scores.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)
        return (weights @ heads(v)).transpose(1, 2).reshape(q.shape)

    seq = x.flatten(2).transpose(1, 2)  # (2, 9, 8)
    pos = position_embedding(3, 3, 8).T.double()
    q, k, v = project(block.qkv, block.norm(x).flatten(2).transpose(1, 2) + pos).chunk(3, dim=-1)
    seq = seq + project(block.out, attend(q, k, v, torch.ones(2, 9, dtype=torch.bool)))
    normed = block.cross_norm(seq.transpose(1, 2).reshape(2, 8, 3, 3)).flatten(2).transpose(1, 2)
    k, v = block.cross_kv(tokens).chunk(2, dim=-1)
    seq = seq + project(block.cross_out, attend(project(block.cross_q, normed + pos), k, v, mask))
    expected = seq.transpose(1, 2).reshape(2, 8, 3, 3)
    torch.testing.assert_close(block(x, tokens, mask), expected, rtol=0, atol=1e-12)


def test_unet_starts_at_zero_output():
    # The output conv is zero-initialised (ADM): an untrained model predicts v = 0.
    model = UNet(tiny_unet_config(attention_resolutions=(16,)))
    assert model(torch.randn(2, 3, 32, 32), torch.rand(2), *text(2)).abs().max() == 0


def test_unet_output_depends_on_time_and_text():
    model = perturbed(UNet(tiny_unet_config(resolution=8)))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.7])
    out = model(x, t, *text(2, seed=0))
    assert not torch.allclose(out, model(x, t.flip(0), *text(2, seed=0)))
    assert not torch.allclose(out, model(x, t, *text(2, seed=1)))


def test_position_embedding_gives_every_pixel_its_own_code():
    from mdm_lite.unet import position_embedding
    table = position_embedding(16, 16, 32)
    assert table.shape == (32, 256)
    distances = torch.cdist(table.T, table.T)
    assert distances[~torch.eye(256, dtype=torch.bool)].min() > 0.01


def test_position_embedding_tells_apart_pixels_that_convolutions_cannot():
    # A flat input looks the same to every convolution at pixels further from the border than
    # the receptive field (about 12 pixels here: 12 3x3 convs, no downsampling, no attention);
    # only the embedding tells them apart.
    flat = torch.zeros(1, 3, 32, 32)
    for with_position in (False, True):
        model = perturbed(UNet(tiny_unet_config(resolution=32, channel_mult=(1,), attention_resolutions=(),
                                                position_embedding=with_position)))
        emb = model.condition(torch.tensor([0.5]), *text(1))
        features = model.denoise(flat, emb, *text(1))[1][0, :, 14:18, 14:18]
        spread = (features - features[:, :1, :1]).abs().max()
        assert (spread > 1e-3) if with_position else (spread < 1e-5), (with_position, spread)


def test_position_embedding_is_rebuilt_on_load_not_saved():
    model = perturbed(UNet(tiny_unet_config(resolution=16, position_embedding=True)))
    assert "pos_table" not in model.state_dict() and "pos_proj.weight" in model.state_dict()
    again = UNet(tiny_unet_config(resolution=16, position_embedding=True))
    again.load_state_dict(model.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    assert torch.equal(model(x, t, *text(2)), again(x, t, *text(2)))


def test_unet_ignores_padding_tokens():
    # A caption padded to a longer batch (mask False, arbitrary values) must mean the same.
    model = perturbed(UNet(tiny_unet_config(resolution=8)))
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    tokens, mask = text(2, length=4)
    padded = torch.cat([tokens, 100 * torch.randn(2, 3, TEXT_DIM)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(x, t, padded, padded_mask), model(x, t, tokens, mask))


def test_unet_without_a_mask_treats_every_token_as_real():
    model = perturbed(UNet(tiny_unet_config(resolution=8)))
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    tokens, mask = text(2)
    torch.testing.assert_close(model(x, t, tokens), model(x, t, tokens, mask))


def test_unet_accepts_a_scalar_timestep():
    model = perturbed(UNet(tiny_unet_config(resolution=8)))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x, 0.4, *text(2)), model(x, torch.full((2,), 0.4), *text(2)))


def test_unconditional_unet_runs_without_text():
    model = perturbed(UNet(tiny_unet_config(resolution=8, text_dim=0)))
    x = torch.randn(2, 3, 8, 8)
    assert model(x, torch.rand(2)).shape == x.shape


# --- NestedUNet -----------------------------------------------------------------------------

def test_one_level_nested_unet_is_a_plain_unet():
    config = tiny_nested_config(16, num_levels=1)
    unet = perturbed(UNet(config.inner))
    nested = NestedUNet(config)
    nested.inner.load_state_dict(unet.state_dict())
    assert sum(p.numel() for p in nested.parameters()) == sum(p.numel() for p in unet.parameters())
    x, t, (tokens, mask) = torch.randn(2, 3, 16, 16), torch.rand(2), text(2)
    (out,) = nested([x], t, tokens, mask)
    torch.testing.assert_close(out, unet(x, t, tokens, mask), rtol=0, atol=0)


@pytest.mark.parametrize("num_levels, resolutions", [(1, [64]), (2, [64, 32]), (3, [64, 32, 16])])
def test_nested_unet_predicts_every_level_at_its_own_shape(num_levels, resolutions):
    config = tiny_nested_config(64, num_levels)
    assert config.resolutions == resolutions
    assert config.inner.resolution == resolutions[-1]
    model = NestedUNet(config)
    zs = noisy_pyramid(resolutions)
    outs = model(zs, torch.rand(2), *text(2))
    assert [o.shape for o in outs] == [z.shape for z in zs]


def test_a_patched_outer_shell_works_on_2x2_blocks_at_half_the_resolution():
    # outer_patch 2: the 32x32 level's shell reads the 32x32 image as 16x16 blocks of 12 channels,
    # with twice the channels and no down- or upsampling; the 16x16 level's shell is unchanged.
    config = dataclasses.replace(tiny_nested_config(32, 3), outer_patch=2)
    model = perturbed(NestedUNet(config))
    shell = model.shell.config
    assert (shell.resolution, shell.in_channels, shell.channels, shell.channel_mult) == (16, 12, 16, (1,))
    assert model.inner.config == tiny_nested_config(16, 2) and model.inner.shell.config.resolution == 16
    zs, t, (tokens, mask) = noisy_pyramid(config.resolutions), torch.rand(2), text(2)
    outs = model(zs, t, tokens, mask)
    assert [o.shape for o in outs] == [z.shape for z in zs]


def test_outer_patch_is_1_or_2():
    with pytest.raises(ConfigError, match="outer_patch"):
        dataclasses.replace(tiny_nested_config(32, 2), outer_patch=4)


def test_nested_unet_wants_one_image_per_level():
    model = NestedUNet(tiny_nested_config(16, 2))
    with pytest.raises(ValueError, match="one per level"):
        model(noisy_pyramid([16]), torch.rand(2), *text(2))


@pytest.mark.parametrize("num_levels", [1, 2, 3])
def test_level_parameters_add_up_to_the_model(num_levels):
    model = NestedUNet(tiny_nested_config(32, num_levels))
    counts = model.level_parameters()
    assert len(counts) == num_levels and all(c > 0 for c in counts)
    assert sum(counts) == sum(p.numel() for p in model.parameters())


def test_only_the_innermost_level_has_a_conditioning_network():
    # The time/text embedding is computed once and shared (MDM Sec. 3.2); a second copy in a shell
    # would be parameters that never get a gradient.
    model = NestedUNet(tiny_nested_config(32, 3))
    names = [n for n, _ in model.named_parameters() if ".conditioning." in n]
    assert names and all(n.startswith("inner.inner.inner.conditioning.") for n in names)


def _train_steps(model, num_levels, steps, seed=0):
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    tokens, mask = text(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss, _ = multires_loss(model, x0, tokens, mask, DiffusionConfig(), num_levels, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x0, tokens, mask


@pytest.mark.parametrize("outer_patch", [1, 2])
def test_gradients_reach_every_parameter_of_every_level(outer_patch):
    # Zero-initialised layers (output convs, the second conv of every residual branch, attention
    # outputs, the two joins) block the gradient to whatever sits behind them at init. The first
    # backward reaches only the output convs; once they have moved, the second reaches the zero
    # layers and what lies between; once those have moved, the third reaches every parameter.
    # A parameter without a gradient at the third step is not wired into the loss.
    model = NestedUNet(dataclasses.replace(tiny_nested_config(16, 2), outer_patch=outer_patch))
    x0, tokens, mask = _train_steps(model, 2, steps=2)
    model.zero_grad()
    g = torch.Generator().manual_seed(1)
    loss, _ = multires_loss(model, x0, tokens, mask, DiffusionConfig(), 2, generator=g)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert no_grad == []


def test_outer_level_loss_reaches_the_inner_levels():
    # Through from_inner the 16x16 prediction uses the last features of the 8x8 net (MDM Sec. 3.2),
    # so the outer loss alone trains every inner parameter but the inner output head (from the third
    # step on, as above).
    model = NestedUNet(tiny_nested_config(16, 2))
    x0, tokens, mask = _train_steps(model, 2, steps=2)
    model.zero_grad()
    outer_only = DiffusionConfig(loss_weights=(1.0, 0.0))
    loss, _ = multires_loss(model, x0, tokens, mask, outer_only, 2, generator=torch.Generator().manual_seed(1))
    loss.backward()
    reached = {n for n, p in model.inner.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    head = {n for n, _ in model.inner.named_parameters() if n.startswith(("inner.norm_out.", "inner.conv_out."))}
    assert head and reached == {n for n, _ in model.inner.named_parameters()} - head


@pytest.mark.parametrize("outer_patch", [1, 2])
def test_wrap_keeps_the_inner_levels_predictions(outer_patch):
    inner = perturbed(NestedUNet(tiny_nested_config(16, 2)))
    config = dataclasses.replace(tiny_nested_config(32, 3), outer_patch=outer_patch)  # inner levels: unpatched
    model = NestedUNet.wrap(inner, config)
    zs, t, (tokens, mask) = noisy_pyramid(config.resolutions), torch.rand(2), text(2)
    outs = model(zs, t, tokens, mask)
    for got, want in zip(outs[1:], inner(zs[1:], t, tokens, mask)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert outs[0].abs().max() == 0  # the new level starts at zero, like any fresh output conv


def mirrored(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with every conv kernel flipped left-right (1x1 kernels and linears unchanged)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(m.weight.flip(-1))
    return model


@pytest.mark.parametrize("num_levels", [2, 3])
def test_a_mirrored_model_on_a_mirrored_pyramid_predicts_the_mirrored_images(num_levels):
    # Convolutions with zero padding, nearest upsampling, GroupNorm and attention without a position
    # embedding all commute with a left-right flip once the kernels are flipped too; so does the
    # average-pooled pyramid. A layer that samples the grid off-centre (a stride-2 3x3 conv centres
    # output j on input 2j, not 2j + 0.5) breaks it at every level it touches, and that is what
    # left a noisy bottom row and left column on the 64x64 samples. Float32 reorderings give ~1e-6.
    config = tiny_nested_config(32, num_levels)
    model = perturbed(NestedUNet(config), scale=0.2)
    zs, t, (tokens, mask) = noisy_pyramid(config.resolutions), torch.rand(2), text(2)
    with torch.no_grad():
        outs = model(zs, t, tokens, mask)
        flipped = mirrored(model)([z.flip(-1) for z in zs], t, tokens, mask)
    for got, want in zip(flipped, outs):
        torch.testing.assert_close(got, want.flip(-1), rtol=1e-4, atol=1e-5)


def test_wrap_refuses_a_mismatched_inner_model():
    inner = NestedUNet(tiny_nested_config(16, 2))
    with pytest.raises(ValueError, match="cannot wrap"):
        NestedUNet.wrap(inner, tiny_nested_config(64, 3))
    with pytest.raises(ValueError, match="cannot wrap"):
        NestedUNet.wrap(inner, tiny_nested_config(32, 2))


def test_a_one_level_model_grows_into_a_model_of_any_shell():
    # A one-level model has no shell: its shell settings build nothing, so they must not stop it
    # growing (or resuming). With two levels they do build the shell, and must match.
    one = tiny_nested_config(16, 1)
    other_shell = dataclasses.replace(one, shell_channels=2 * one.shell_channels, shell_num_res_blocks=0)
    assert one.same_network(other_shell) and one != other_shell
    model = NestedUNet.wrap(NestedUNet(other_shell), dataclasses.replace(one, image_size=32, num_levels=2))
    assert model.config.shell_channels == one.shell_channels
    two = tiny_nested_config(32, 2)
    assert not two.same_network(dataclasses.replace(two, shell_num_res_blocks=two.shell_num_res_blocks + 1))
    assert not one.same_network(dataclasses.replace(one, inner=dataclasses.replace(one.inner, channels=16)))


def test_a_small_nested_unet_overfits_one_batch():
    # Two fixed 16x16 Shapes images with their captions, fresh t and noise every step: the loss
    # (MDM Eq. 4, v-prediction, default schedule) must fall at least 10x. It is evaluated on 64
    # (t, noise) draws from one fixed seed before and after, so the two numbers are comparable.
    # Measured: 12.3x, 12.4x and 13.1x for seeds 0, 1, 2 (300 steps). What is left is mostly at
    # t < 0.1, where v is nearly eps and recovering it takes x0 to a precision below sigma_t.
    config = NestedUNetConfig(image_size=16, num_levels=2, shell_channels=8,
                              inner=UNetConfig(channels=16, channel_mult=(1,), num_res_blocks=1,
                                               attention_resolutions=(), text_dim=TEXT_DIM))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = NestedUNet(config)
    shapes = ShapesDataset(length=2, image_size=16)
    x0 = torch.stack([shapes[i]["image"] for i in range(2)])
    tokens, mask = text(2)
    diffusion = DiffusionConfig()

    def loss_on(copies: int, generator: torch.Generator) -> torch.Tensor:
        return multires_loss(model, x0.repeat(copies, 1, 1, 1), tokens.repeat(copies, 1, 1), mask.repeat(copies, 1),
                             diffusion, 2, generator=generator)[0]

    def evaluate() -> float:
        with torch.no_grad():
            return loss_on(32, torch.Generator().manual_seed(1234)).item()

    before = evaluate()
    start = time.perf_counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=True)  # one op per step, not per tensor
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = loss_on(4, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    after = evaluate()
    print(f"overfit: loss {before:.4f} -> {after:.4f} ({before / after:.1f}x) in {seconds:.1f} s")
    assert before / after >= 10
