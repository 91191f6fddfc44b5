"""A web demo of a trained model: a prompt in, every nesting level and their joint trajectory out
(chapter 7 shows it).

::

    mdm-lite demo                        # the shipped Shapes checkpoint at http://127.0.0.1:7860
    mdm-lite demo --checkpoint output --port 8000

    import mdm_lite.demo                 # in a notebook or Colab: the page inline, in the cell's output
    mdm_lite.demo.launch()

Gradio comes with the optional extra ``demo`` (``pip install "mdm-lite[demo]"``); only this module
imports it. Every request draws its noise from a generator of its own, seeded by the request's
seed, so the same values give the same images whoever else uses the page; requests run one at a
time, in the order they arrive.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
import uuid
from pathlib import Path

from PIL import Image, ImageDraw
from torch import Tensor

try:
    import gradio as gr
except ModuleNotFoundError as error:
    raise ModuleNotFoundError('the demo needs Gradio: pip install "mdm-lite[demo]"', name=error.name) from error

from .checkpoint import resolve_checkpoint
from .data import ShapesDataset
from .images import to_pil
from .pipeline import MDMPipeline
from .samplers import DEFAULT_GUIDANCE_INTERVAL, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS

DISPLAY_SIZE = 256  # every level is shown at this side, upscaled without smoothing
FRAME_SIZE = 128  # a level's side in a frame of the trajectory animation
MAX_PROMPT_CHARS = 300
MAX_STEPS = 200
MAX_GUIDANCE = 20.0
MAX_SEED = 9999
KEEP_ANIMATIONS = 64  # animations kept on disk; Gradio serves its own copy of each
CSS = ".level img, #trajectory img { image-rendering: pixelated; }"  # the browser scales without smoothing


def upscale(image: Tensor, size: int) -> Image.Image:
    """A (3, R, R) image in [-1, 1] as a size x size PIL image, each pixel a block (nearest neighbour)."""
    return to_pil(image[None])[0].resize((size, size), Image.NEAREST)


def trajectory_frames(trajectory: list[dict], size: int = FRAME_SIZE) -> list[Image.Image]:
    """One frame per step of `samplers.sample`'s trajectory: its time on top, then the noisy levels
    z (first row) and their predicted x0 (second row), largest level first, each upscaled to size."""
    header = 16
    frames = []
    for step in trajectory:
        frame = Image.new("RGB", (size * len(step["z"]), header + 2 * size), "white")
        for row, key in enumerate(("z", "x0")):
            for column, level in enumerate(step[key]):
                frame.paste(upscale(level[0], size), (column * size, header + row * size))
        ImageDraw.Draw(frame).text((4, 2), f"t = {step['t']:.3f}   top: noisy z   bottom: predicted x0", fill="black")
        frames.append(frame)
    return frames


def _whole(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or not low <= value <= high:
        raise gr.Error(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(value)


def check_values(prompt, steps, guidance, seed, sampler) -> tuple[str, int, float, int, str]:
    """A request's values, checked: (prompt stripped, steps, guidance, seed, sampler). A value out
    of range raises gr.Error, whose one-line message the page shows and that names the fix."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise gr.Error("type a prompt first, e.g. one of the examples")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise gr.Error(f"the prompt has {len(prompt)} characters; shorten it to {MAX_PROMPT_CHARS} at most")
    steps = _whole(steps, "steps", 1, MAX_STEPS)
    seed = _whole(seed, "seed", 0, MAX_SEED)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not (
            math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise gr.Error(f"guidance must be a number from 0 to {MAX_GUIDANCE:g} (1: no guidance), got {guidance!r}")
    if sampler not in SAMPLERS:
        raise gr.Error(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    return prompt.strip(), steps, float(guidance), seed, sampler


def example_prompts(config: dict, count: int = 6) -> list[str]:
    """Prompts the checkpoint was trained on: its sample prompts, or for Shapes the captions of its
    first training scenes; none for other datasets."""
    if config.get("sample_prompts"):
        return list(config["sample_prompts"])
    if config.get("dataset") == "shapes":
        shapes = ShapesDataset(**{**config.get("dataset_options", {}), "length": count})
        return [shapes.scene(i)[0] for i in range(count)]
    return []


class Demo:
    """The model behind the page and the one thing the page does, `generate`.

    checkpoint: a checkpoint directory, an output_dir or "shapes" (the one shipped in the package).
    """

    def __init__(self, checkpoint: str | Path = "shapes", device: str = "auto"):
        self.checkpoint = resolve_checkpoint(checkpoint)
        self.pipeline = MDMPipeline.from_pretrained(self.checkpoint, device=device)
        self.examples = example_prompts(json.loads((self.checkpoint / "config.json").read_text()))
        self._folder = tempfile.TemporaryDirectory(prefix="mdm-lite-demo-")

    def generate(self, prompt: str, steps: int, guidance: float, seed: int, sampler: str):
        """One image for `prompt`: (every level upscaled to DISPLAY_SIZE, largest first, ..., the
        path of the trajectory animation (GIF), a line with the seconds per image and the values)."""
        prompt, steps, guidance, seed, sampler = check_values(prompt, steps, guidance, seed, sampler)
        start = time.perf_counter()
        out = self.pipeline(prompt, num_inference_steps=steps, guidance_scale=guidance, sampler=sampler, seed=seed,
                            output_type="pt", return_trajectory=True)
        seconds = time.perf_counter() - start
        levels = [upscale(level[0], DISPLAY_SIZE) for level in out.levels]
        return (*levels, str(self._animate(out.trajectory)),
                f"{seconds:.2f} s/image on {self.pipeline.device.type} ({steps} {sampler} steps, guidance "
                f"{guidance:g} at t >= {DEFAULT_GUIDANCE_INTERVAL[0]:g}, seed {seed})")

    def _animate(self, trajectory: list[dict]) -> Path:
        frames = trajectory_frames(trajectory)
        durations = [max(40, 3000 // len(frames))] * (len(frames) - 1) + [2000]  # about 3 s, then hold the end
        folder = Path(self._folder.name)
        path = folder / f"trajectory_{uuid.uuid4().hex}.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
        for old in sorted(folder.glob("*.gif"), key=lambda p: p.stat().st_mtime)[:-KEEP_ANIMATIONS]:
            old.unlink(missing_ok=True)
        return path

    def app(self) -> gr.Blocks:
        """The page: a prompt with examples, the sampling values, every level, the animation, the time."""
        resolutions = self.pipeline.resolutions
        with gr.Blocks(title="mdm-lite demo", analytics_enabled=False) as app:
            gr.Markdown(f"## mdm-lite: Matryoshka Diffusion\nOne network draws the "
                        f"{' / '.join(str(r) for r in resolutions)} images of a prompt at once. Checkpoint "
                        f"`{self.checkpoint.name}`, on {self.pipeline.device.type}.")
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", value=self.examples[0] if self.examples else "", max_lines=2,
                                    scale=4, elem_id="prompt")
                button = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
            with gr.Row():
                steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Steps")
                guidance = gr.Slider(0, MAX_GUIDANCE, value=3.0, step=0.5, label="Guidance (1: none)")
                seed = gr.Slider(0, MAX_SEED, value=0, step=1, label="Seed")
                sampler = gr.Radio(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler")
            timing = gr.Markdown(elem_id="timing")
            with gr.Row():
                levels = []
                for r in resolutions:
                    with gr.Column(min_width=DISPLAY_SIZE):
                        gr.Markdown(f"**{r}x{r}**")
                        levels.append(gr.Image(type="pil", format="png", show_label=False, interactive=False,
                                               buttons=["download", "fullscreen"], elem_classes="level"))
            gr.Markdown("**The joint trajectory**, t from 1 to 0: every level at each step, the noisy z above "
                        "and the predicted x0 below")
            animation = gr.Image(type="filepath", show_label=False, interactive=False,
                                 buttons=["download", "fullscreen"], elem_id="trajectory")
            if self.examples:
                gr.Examples([[p] for p in self.examples], inputs=[prompt], label="Example prompts")
            inputs, outputs = [prompt, steps, guidance, seed, sampler], [*levels, animation, timing]
            button.click(self.generate, inputs, outputs, api_name="generate")
            prompt.submit(self.generate, inputs, outputs, api_name=False)
        return app

    def launch(self, host: str = "127.0.0.1", port: int | None = None, **options) -> gr.Blocks:
        """Serve `app()`; see the module's `launch`."""
        app = self.app()
        app.launch(server_name=host, server_port=port, css=CSS, **{"share": False, **options})
        return app


def launch(checkpoint: str | Path = "shapes", device: str = "auto", host: str = "127.0.0.1", port: int | None = None,
           **options) -> gr.Blocks:
    """Serve the demo of `checkpoint` on host:port (port None: the first free one from 7860) and
    return the running app (`app.close()` stops it).

    In a notebook or Colab the page shows inline, in the cell's output, and the call returns at
    once; from a script it blocks until Ctrl-C. options: those of `gr.Blocks.launch`; share is
    False unless given (share=True: a public link through Gradio's servers).
    """
    return Demo(checkpoint, device).launch(host, port, **options)
