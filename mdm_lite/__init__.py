"""mdm_lite: Matryoshka Diffusion Models (Gu et al. 2023), small enough to read and to train on a laptop.

A module per concept, each built by a chapter of the book (README, "The package, module by
module"). Imports run one way: cli -> train -> pipeline -> the model (unet, nested), diffusion,
samplers, schedule, text and data. `mdm_lite.train` is the module; its function is
`mdm_lite.train.train`.
"""
from .data import (
    HELDOUT_PAIRS,
    CaptionedImageDataset,
    DatasetError,
    ShapesConfig,
    ShapesDataset,
    caption_for,
    collate,
    heldout_prompts,
    load_dataset,
    prefetch,
    preprocess,
    render_scene,
    sample_attributes,
)
from .checkpoint import CheckpointError, load_checkpoint
from .diffusion import DiffusionConfig, drop_captions, image_pyramid, multires_loss
from .nested import NestedUNet, NestedUNetConfig
from .compare import flat_baseline
from .images import from_pil, to_pil
from .pipeline import MDMPipeline, PipelineOutput
from .plotting import show_images
from .samplers import ddim_sample, ddpm_sample
from .schedule import add_noise, alpha_sigma, cosine_logsnr, predict_x0_eps, shifted_cosine_logsnr, velocity
from .train import PRESETS, TrainConfig, TrainResult
from .text import DEFAULT_TEXT_ENCODER, TextEmbedding, TextEncoder, TextEncoderError, masked_mean
from .unet import UNet, UNetConfig

__version__ = "0.1.0"
