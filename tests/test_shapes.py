"""Shapes: deterministic, captioned, judgeable scenes with a held-out set of combinations."""

import itertools
import json
import random
import re

import numpy as np
import pytest
import torch

from mdm_lite.data import shapes as S
from mdm_lite.data.shapes import ShapesConfig, ShapesDataset, caption_for, heldout_prompts, render_scene


def _alternation(words_by_value: dict) -> str:
    words = sorted((w for ws in words_by_value.values() for w in ws), key=len, reverse=True)
    return "|".join(re.escape(w) for w in words)


def _value(word: str, words_by_value: dict) -> str:
    return next(value for value, words in words_by_value.items() if word in words)


_OBJECT = (rf"an? (?P<{{p}}size>{_alternation(S.SIZE_WORDS)}) (?P<{{p}}colour>{_alternation(S.COLOUR_WORDS)}) "
           rf"(?P<{{p}}shape>{_alternation(S.SHAPE_WORDS)})")
_SINGLE = re.compile(_OBJECT.format(p=""))
_PAIR = re.compile(_OBJECT.format(p="a_") + rf" (?P<relation>{_alternation(S.RELATION_PHRASES)}) "
                   + _OBJECT.format(p="b_"))
_POSITION = re.compile(_alternation(S.POSITION_PHRASES))
_BACKGROUND = re.compile(rf"\b({_alternation(S.BACKGROUND_WORDS)}) background\b")
_WORDS = {"size": S.SIZE_WORDS, "colour": S.COLOUR_WORDS, "shape": S.SHAPE_WORDS}


def _read_object(match: re.Match, prefix: str = "") -> dict:
    return {key: _value(match[prefix + key], words) for key, words in _WORDS.items()}


def _read_caption(caption: str) -> dict:
    """A two-object caption read back, in the layout of the dataset's attributes."""
    pair = _PAIR.search(caption)
    background = _value(_BACKGROUND.search(caption)[1], S.BACKGROUND_WORDS)
    return {"objects": [_read_object(pair, "a_"), _read_object(pair, "b_")],
            "relation": _value(pair["relation"], S.RELATION_PHRASES), "background": background}


def _stated_values(attributes: dict) -> dict:
    """What a one-object caption should say: each attribute's value, None where it is left out."""
    return {name: attributes[name] if name in attributes["stated"] else None for name in S.ATTRIBUTE_NAMES}


def _without_positions(attributes: dict) -> dict:
    objects = [{k: v for k, v in obj.items() if k != "position"} for obj in attributes["objects"]]
    return {"objects": objects, "relation": attributes["relation"], "background": attributes["background"]}


def _grid_cell(position: str) -> tuple[int, int]:
    return divmod(S.POSITIONS.index(position), 3)


def test_a_sample_is_a_function_of_seed_and_index():
    a, b = ShapesDataset(length=50, seed=3), ShapesDataset(length=50, seed=3)
    for index in (0, 17, 49):
        assert torch.equal(a[index]["image"], b[index]["image"])
        assert a[index]["caption"] == b[index]["caption"]
        assert a[index]["attributes"] == b[index]["attributes"]
    other_seed = ShapesDataset(length=50, seed=4)
    assert [a.scene(i) for i in range(20)] != [other_seed.scene(i) for i in range(20)]


def test_items_are_images_in_minus_one_to_one_with_caption_and_attributes():
    item = ShapesDataset(length=4)[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert isinstance(item["caption"], str)
    assert json.loads(json.dumps(item["attributes"])) == item["attributes"]


@pytest.mark.parametrize("size", [16, 48, 128])
def test_scenes_render_at_any_resolution(size):
    assert ShapesDataset(length=1, image_size=size)[0]["image"].shape == (3, size, size)


def test_edges_are_anti_aliased():
    image = render_scene({"shape": "circle", "colour": "red", "size": "large", "position": "center",
                          "background": "black"}, 64)
    red = image[0]
    blends = ((red > red.min() + 0.05) & (red < red.max() - 0.05)).sum()
    assert blends > 10  # pixels between background and object along the rim


def test_the_object_is_drawn_in_its_cell_in_its_colour_on_its_background():
    for position, colour, background in [("top left", "red", "black"), ("bottom right", "blue", "white"),
                                         ("center", "yellow", "gray")]:
        attributes = {"shape": "square", "colour": colour, "size": "large", "position": position,
                      "background": background}
        pixels = (render_scene(attributes, 63) + 1) * 127.5  # 63 = three 21-pixel cells
        row, col = _grid_cell(position)
        for r, c in itertools.product(range(3), range(3)):
            centre = pixels[:, r * 21 + 8: r * 21 + 13, c * 21 + 8: c * 21 + 13].mean((1, 2))
            expected = S.COLOURS[colour] if (r, c) == (row, col) else S.BACKGROUNDS[background]
            torch.testing.assert_close(centre, torch.tensor(expected, dtype=torch.float32), atol=2, rtol=0)


def test_object_colours_stand_out_from_every_background():
    for colour, background in itertools.product(S.COLOURS.values(), S.BACKGROUNDS.values()):
        assert np.linalg.norm(np.subtract(colour, background)) > 90


@pytest.mark.parametrize("phrasing", S.PHRASINGS)
def test_single_object_captions_state_exactly_their_stated_attributes(phrasing):
    data = ShapesDataset(length=1000, difficulty="single", phrasing=phrasing)
    for index in range(len(data)):
        caption, attributes = data.scene(index)
        assert S.read_caption(caption) == _stated_values(attributes), caption


def test_captions_leave_attributes_out_at_their_rates_and_always_name_the_shape():
    # 4,000 captions: a binomial rate p has a standard error of at most 0.008, so 0.03 is > 3.5 sigma.
    scenes = [ShapesDataset(length=4000).scene(i)[1] for i in range(4000)]
    assert all("shape" in a["stated"] for a in scenes)
    for name, p in S.OMIT_PROBABILITY.items():
        omitted = np.mean([name not in a["stated"] for a in scenes])
        assert abs(omitted - p) < 0.03, (name, omitted, p)


def test_with_omit_off_every_caption_names_every_attribute_of_the_same_scene():
    # the layout stage of the progressive recipe trains on these (mdm_lite.recipe)
    for i in range(300):
        caption, attributes = S.make_scene(i, omit=False)
        assert S.read_caption(caption) == {name: attributes[name] for name in S.ATTRIBUTE_NAMES}, caption
        _, usual = S.make_scene(i)
        assert {k: v for k, v in attributes.items() if k != "stated"} == {k: v for k, v in usual.items() if k != "stated"}
    item = S.ShapesDataset(length=4, omit=False)[3]
    assert item["attributes"]["stated"] == list(S.ATTRIBUTE_NAMES)


def test_training_captions_never_use_a_heldout_phrasing():
    heldout_words = {w for ws in S.HELDOUT_SIZE_WORDS.values() for w in ws}
    heldout_positions = {p for ps in S.HELDOUT_POSITION_PHRASES.values() for p in ps}
    positions = S._phrase_pattern(S._merged(S.POSITION_PHRASES, S.HELDOUT_POSITION_PHRASES))
    openings = [t.split("{")[0] for t in S.HELDOUT_TEMPLATES if not t.startswith("{")]
    for index in range(3000):
        caption = ShapesDataset(length=3000).scene(index)[0]
        assert not heldout_words & set(caption.split()), caption
        assert not heldout_positions & set(positions.findall(caption)), caption
        assert not any(caption.startswith(o) for o in openings), caption
        assert not any(b.split("{")[-1] and b.split("{")[-1].strip() in caption.split()
                       for b in S.HELDOUT_BACKGROUND_PHRASES), caption


def test_heldout_phrasings_describe_the_same_scenes_in_other_words():
    train, heldout = ShapesDataset(length=200), ShapesDataset(length=200, phrasing="heldout")
    # A template's own words, in order, whatever fills (or leaves out) its slots.
    templates = [re.compile(".*".join(re.escape(w.strip(" ,")) for w in re.split(r"\{\w+\}", t) if w.strip(" ,")))
                 for t in S.HELDOUT_TEMPLATES]
    for index in range(200):
        (caption_a, a), (caption_b, b) = train.scene(index), heldout.scene(index)
        assert {k: v for k, v in a.items() if k != "stated"} == {k: v for k, v in b.items() if k != "stated"}
        assert caption_a != caption_b
        assert any(t.match(caption_b) for t in templates), caption_b


def test_the_readme_and_book_prompts_read_back_as_meant():
    assert S.read_caption("a small blue star top left") == {
        "shape": "star", "colour": "blue", "size": "small", "position": "top left", "background": None}
    assert S.read_caption("a large red circle in the center") == {
        "shape": "circle", "colour": "red", "size": "large", "position": "center", "background": None}
    assert S.read_caption("a big green heart upper-left on black")["position"] == "top left"


def test_two_object_captions_state_both_objects_their_relation_and_the_background():
    data = ShapesDataset(length=400, difficulty="relations")
    pairs = 0
    for index in range(len(data)):
        caption, attributes = data.scene(index)
        if "objects" not in attributes:
            assert S.read_caption(caption) == _stated_values(attributes), caption
            continue
        pairs += 1
        read = _read_caption(caption)
        swapped = {"objects": read["objects"][::-1], "relation": S.INVERSE_RELATION[read["relation"]],
                   "background": read["background"]}
        assert _without_positions(attributes) in (read, swapped), caption
    assert 150 < pairs < 250  # about half the scenes


def test_two_objects_share_a_row_or_column_as_their_relation_says():
    data = ShapesDataset(length=300, difficulty="relations")
    for index in range(len(data)):
        attributes = data.scene(index)[1]
        if "objects" not in attributes:
            continue
        (row_a, col_a), (row_b, col_b) = (_grid_cell(o["position"]) for o in attributes["objects"])
        expected = {"left of": row_a == row_b and col_a < col_b, "right of": row_a == row_b and col_a > col_b,
                    "above": col_a == col_b and row_a < row_b, "below": col_a == col_b and row_a > row_b}
        assert expected[attributes["relation"]], attributes


def test_one_scene_is_described_in_several_phrasings():
    attributes = {"shape": "star", "colour": "purple", "size": "small", "position": "top", "background": "gray"}
    captions = {caption_for(attributes, random.Random(i)) for i in range(50)}
    assert len(captions) > 10
    for caption in captions:  # each names its attributes rightly, or leaves them out
        assert all(v in (None, attributes[k]) for k, v in S.read_caption(caption).items()), caption


def test_without_a_generator_the_caption_is_canonical():
    attributes = {"shape": "circle", "colour": "orange", "size": "large", "position": "top left",
                  "background": "black"}
    assert caption_for(attributes) == "a large orange circle in the top left corner on a black background"
    pair = {"objects": [{"shape": "circle", "colour": "red", "size": "small", "position": "left"},
                        {"shape": "square", "colour": "blue", "size": "large", "position": "right"}],
            "relation": "left of", "background": "white"}
    assert caption_for(pair) == "a small red circle to the left of a large blue square on a white background"


def _pairs_of(attributes: dict) -> set:
    return {(o["shape"], o["colour"]) for o in S.scene_objects(attributes)}


@pytest.mark.parametrize("difficulty", ["single", "relations"])
def test_training_never_shows_a_heldout_combination(difficulty):
    data = ShapesDataset(length=500, difficulty=difficulty)
    assert not any(_pairs_of(data.scene(i)[1]) & S.HELDOUT_PAIRS for i in range(len(data)))


@pytest.mark.parametrize("difficulty", ["single", "relations"])
def test_every_heldout_scene_contains_a_heldout_combination(difficulty):
    data = ShapesDataset(length=200, split="heldout", difficulty=difficulty)
    assert all(_pairs_of(data.scene(i)[1]) & S.HELDOUT_PAIRS for i in range(len(data)))


def test_training_still_shows_every_shape_and_every_colour():
    data = ShapesDataset(length=500)
    seen = set().union(*(_pairs_of(data.scene(i)[1]) for i in range(len(data))))
    assert {shape for shape, _ in seen} == set(S.SHAPES)
    assert {colour for _, colour in seen} == set(S.COLOURS)


def test_difficulty_single_gives_one_object_per_scene():
    data = ShapesDataset(length=200, difficulty="single")
    assert all("objects" not in data.scene(i)[1] for i in range(len(data)))


def test_heldout_prompts_are_deterministic_heldout_scenes():
    prompts = heldout_prompts(20, seed=1)
    assert prompts == heldout_prompts(20, seed=1)
    assert prompts == [ShapesDataset(length=20, seed=1, split="heldout").scene(i) for i in range(20)]
    assert all(S.read_caption(caption) == _stated_values(attributes) for caption, attributes in prompts)


def test_config_and_keyword_arguments_build_the_same_dataset():
    config = ShapesConfig(length=7, image_size=32, seed=5, split="heldout", difficulty="relations")
    assert ShapesDataset(config).config == ShapesDataset(length=7, image_size=32, seed=5, split="heldout",
                                                         difficulty="relations").config
    assert len(ShapesDataset(config)) == 7


@pytest.mark.parametrize("bad", [{"split": "test"}, {"difficulty": "hard"}, {"length": 0}])
def test_invalid_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        ShapesConfig(**bad)


def test_indexing_past_the_end_raises_index_error():
    with pytest.raises(IndexError):
        ShapesDataset(length=3)[3]
