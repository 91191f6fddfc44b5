"""The web demo on the shipped checkpoint: its function, its API through gradio_client against a
server on localhost, several users at once, and the page in a real headless Chromium.

Every request runs 2 to 4 sampling steps: the tests check what the page shows, not image quality.
"""

import math
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mdm_lite.samplers import DEFAULT_SAMPLER

gr = pytest.importorskip("gradio", reason='the demo extra is not installed: pip install -e ".[dev]"')
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from mdm_lite.demo import DISPLAY_SIZE, Demo, check_values  # noqa: E402
from mdm_lite.samplers import SAMPLERS  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; .ci/run installs it
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "lower-left, a large blue star on a grey background"


@pytest.fixture(scope="module")
def demo():
    return Demo("shapes", device="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo):
    """The demo served on a free port of 127.0.0.1, as `mdm-lite demo` serves it."""
    app = demo.launch(port=_free_port(), prevent_thread_lock=True, quiet=True)
    yield app
    app.close()


def _pixels(image) -> np.ndarray:
    return np.asarray(Image.open(image).convert("RGB") if isinstance(image, (str, Path)) else image.convert("RGB"))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_generate_shows_every_level_upscaled_without_smoothing_the_trajectory_and_the_time(demo, sampler):
    *levels, animation, timing = demo.generate(PROMPT, 3, 3.0, 1, sampler)
    assert len(levels) == 3
    for image, resolution in zip(levels, (64, 32, 16)):
        assert image.size == (DISPLAY_SIZE, DISPLAY_SIZE)
        blocks = image.resize((resolution, resolution), Image.NEAREST).resize(image.size, Image.NEAREST)
        assert np.array_equal(_pixels(blocks), _pixels(image)), "each pixel of a level must be one flat block"
    with Image.open(animation) as gif:
        assert gif.n_frames == 3  # one frame per step
    assert "s/image on cpu (3 " + sampler in timing and float(timing.split()[0]) > 0


def test_the_same_seed_gives_the_same_images_and_another_seed_does_not(demo):
    first, again, other = (demo.generate(PROMPT, 2, 3.0, seed, "ddpm")[0] for seed in (5, 5, 6))
    assert np.array_equal(_pixels(first), _pixels(again))
    assert not np.array_equal(_pixels(first), _pixels(other))


@pytest.mark.parametrize("values, fix", [
    (("  ", 4, 3.0, 0, "ddim"), "type a prompt"),
    (("x" * 301, 4, 3.0, 0, "ddim"), "300 at most"),
    ((PROMPT, 0, 3.0, 0, "ddim"), "steps must be a whole number from 1 to 200"),
    ((PROMPT, 2.5, 3.0, 0, "ddim"), "steps must be a whole number"),
    ((PROMPT, 4, math.nan, 0, "ddim"), "guidance must be a number from 0 to 20"),
    ((PROMPT, 4, -1.0, 0, "ddim"), "guidance must be a number from 0 to 20"),
    ((PROMPT, 4, 3.0, -1, "ddim"), "seed must be a whole number from 0 to 9999"),
    ((PROMPT, 4, 3.0, "7", "ddim"), "seed must be a whole number"),
    ((PROMPT, 4, 3.0, 0, "euler"), "choose one of " + ", ".join(SAMPLERS)),
])
def test_a_bad_value_is_refused_with_one_line_that_names_the_fix(values, fix):
    with pytest.raises(gr.Error) as error:
        check_values(*values)
    assert fix in error.value.message and "\n" not in error.value.message


def test_the_server_listens_on_this_machine_only(server):
    assert server.local_url.startswith("http://127.0.0.1:")


def test_the_api_returns_three_levels_the_animation_and_the_time(demo, server):
    *levels, animation, timing = Client(server.local_url, verbose=False).predict(
        PROMPT, 2, 3.0, 3, "ddim", api_name="/generate")
    expected = demo.generate(PROMPT, 2, 3.0, 3, "ddim")
    for served, image in zip(levels, expected):
        assert np.array_equal(_pixels(served), _pixels(image))
    assert animation.endswith(".gif") and "s/image" in timing


@pytest.mark.parametrize("steps, message", [(2.5, "steps must be a whole number from 1 to 200"),
                                            (500, "greater than maximum value 200")])  # Gradio's own check
def test_the_api_refuses_a_bad_value_with_its_message(server, steps, message):
    with pytest.raises(AppError, match=message):
        Client(server.local_url, verbose=False).predict(PROMPT, steps, 3.0, 0, "ddim", api_name="/generate")


def test_users_at_the_same_time_each_get_the_images_of_their_own_seed(demo, server):
    seeds = (11, 12, 13)
    served = {}

    def user(seed):
        served[seed] = Client(server.local_url, verbose=False).predict(PROMPT, 2, 3.0, seed, "ddpm",
                                                                       api_name="/generate")[0]

    users = [threading.Thread(target=user, args=(seed,)) for seed in seeds]
    for thread in users:
        thread.start()
    for thread in users:
        thread.join(timeout=120)
    for seed in seeds:
        assert np.array_equal(_pixels(served[seed]), _pixels(demo.generate(PROMPT, 2, 3.0, seed, "ddpm")[0])), seed


def test_in_a_real_browser_a_prompt_and_a_click_show_three_images(server, tmp_path):
    if not CHROMIUM.exists() and os.environ.get("CI") != "true":
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium (CI installs it and runs this test)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(server.local_url)
            page.locator("#prompt textarea").fill(PROMPT)
            page.get_by_label("number input for Steps").fill("3")
            page.locator("#generate").click()
            page.wait_for_function(
                "() => [...document.querySelectorAll('.level img')].filter("
                f"i => i.complete && i.naturalWidth === {DISPLAY_SIZE}).length === 3", timeout=60_000)
            assert f"3 {DEFAULT_SAMPLER} steps" in page.locator("#timing").inner_text()
        finally:
            browser.close()
