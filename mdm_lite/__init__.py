"""mdm_lite: Matryoshka Diffusion Models (Gu et al. 2023), small enough to read and to train on a laptop.

`mdm_lite.sample` and `mdm_lite.train` are modules (the pipeline; the training loop); their main
functions are `mdm_lite.samplers.sample` (also `ddim_sample`, `ddpm_sample`) and
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
from .sample import MDMPipeline, PipelineOutput
from .samplers import ddim_sample, ddpm_sample
from .schedule import add_noise, alpha_sigma, cosine_logsnr, predict_x0_eps, shifted_cosine_logsnr, velocity
from .train import PRESETS, TrainConfig, TrainResult, flat_baseline
from .text import DEFAULT_TEXT_ENCODER, TextEmbedding, TextEncoder, TextEncoderError
from .unet import UNet, UNetConfig

__version__ = "0.1.0"
