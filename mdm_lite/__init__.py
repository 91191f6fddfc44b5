"""mdm_lite: Matryoshka Diffusion Models (Gu et al. 2023), small enough to read and to train on a laptop."""
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
from .diffusion import DiffusionConfig, ddim_sample, ddpm_sample, drop_captions, image_pyramid, multires_loss, sample
from .nested import NestedUNet, NestedUNetConfig
from .sample import MDMPipeline, PipelineOutput
from .schedule import add_noise, alpha_sigma, cosine_logsnr, predict_x0_eps, shifted_cosine_logsnr, velocity
from .train import PRESETS, TrainConfig, TrainResult, flat_baseline, train
from .text import DEFAULT_TEXT_ENCODER, TextEmbedding, TextEncoder, TextEncoderError
from .unet import UNet, UNetConfig

__version__ = "0.1.0"
