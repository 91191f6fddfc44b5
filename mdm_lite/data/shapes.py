"""Shapes: a procedural captioned image dataset, rendered on the fly (no files, no download).

A scene holds one or two flat-coloured objects on a plain background. Each object has a
shape, a colour, a size and a cell of a 3x3 grid. Every sample comes with its caption and
with its attributes as JSON-serialisable data, so a judge can check a generated image
against the prompt that produced it.

Attributes of a one-object scene::

    {"shape": "star", "colour": "red", "size": "small", "position": "top left",
     "background": "black"}

Attributes of a two-object scene (``objects[0]`` stands ``relation`` ``objects[1]``)::

    {"objects": [{"shape": "circle", "colour": "red", "size": "large", "position": "left"},
                 {"shape": "square", "colour": "blue", "size": "small", "position": "right"}],
     "relation": "left of", "background": "white"}

A one-object caption names all five attributes. A two-object caption names both objects'
size, colour and shape, their relation, and the background, but not their grid cells:
"a large red circle to the left of a small blue square on a white background". Two objects
always share a row (left of / right of) or a column (above / below), so the relation is
never ambiguous.

Composition test: the (shape, colour) pairs in ``HELDOUT_PAIRS`` never appear in the
"train" split; every scene of the "heldout" split contains at least one of them.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..images import from_pil
from .phrasing import with_article

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond")
COLOURS = {  # RGB; chosen to stay distinct from each other and from every background
    "red": (220, 40, 40),
    "orange": (245, 145, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 70),
    "cyan": (40, 200, 220),
    "blue": (40, 80, 225),
    "purple": (150, 60, 200),
    "pink": (245, 125, 190),
}
BACKGROUNDS = {"black": (20, 20, 20), "white": (245, 245, 245), "gray": (110, 110, 110)}
SIZES = {"small": 0.24, "large": 0.42}  # object radius as a fraction of a grid cell's width
POSITIONS = (  # the 3x3 grid, row by row
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
RELATIONS = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SPLITS = ("train", "heldout")
DIFFICULTIES = ("single", "relations")  # one object per scene; or half the scenes with two

# One colour per shape and one shape per colour, so every shape and every colour is still
# seen in training, only never together.
HELDOUT_PAIRS = frozenset({
    ("circle", "purple"),
    ("square", "orange"),
    ("triangle", "cyan"),
    ("star", "red"),
    ("heart", "blue"),
    ("diamond", "yellow"),
})
_ALL_PAIRS = tuple((shape, colour) for shape in SHAPES for colour in COLOURS)
_PAIRS = {
    "train": tuple(p for p in _ALL_PAIRS if p not in HELDOUT_PAIRS),
    "heldout": tuple(p for p in _ALL_PAIRS if p in HELDOUT_PAIRS),
}

# Phrasing. Captions are written the way people write prompts: many templates and word orders,
# synonyms ("upper-left", "centred", "big", "on black"), and attributes left out (the image then
# has any value of them, and a judge scores only what the caption states). Every value has one or
# more phrases, the first being the canonical one; a caption can be read back by matching the
# longest phrase first. The HELDOUT_* phrasings are never used in training: `phrasing="heldout"`
# captions always use a held-out template, and draw their words from both sets.
SHAPE_WORDS = {
    "circle": ("circle", "disk", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star",),
    "heart": ("heart",),
    "diamond": ("diamond", "rhombus"),
}
COLOUR_WORDS = {colour: (colour,) for colour in COLOURS} | {"purple": ("purple", "violet")}
BACKGROUND_WORDS = {"black": ("black",), "white": ("white",), "gray": ("gray", "grey")}
SIZE_WORDS = {"small": ("small", "little", "tiny", "mini", "smallish", "petite"),
              "large": ("large", "big", "massive", "enormous", "oversized")}
POSITION_PHRASES = {
    "top left": ("in the top left corner", "at the upper left", "top left", "in the top left", "upper-left",
                 "top-left", "at the top left",
                 "towards the top left", "in the top-left area", "close to the top left"),
    "top": ("at the top", "at the top edge", "top", "at the top center", "top center", "at the top middle",
            "towards the top", "in the upper part", "close to the top"),
    "top right": ("in the top right corner", "at the upper right", "top right", "in the top right", "upper-right",
                  "top-right", "at the top right",
                  "towards the top right", "in the top-right area", "close to the top right"),
    "left": ("on the left", "at the left side", "left", "on the left side", "at the left edge",
             "towards the left", "on the left-hand side", "close to the left"),
    "center": ("in the center", "in the middle", "center", "centered", "centred", "in the centre",
               "in the middle of the image",
               "in the very middle", "right in the center", "at the centre"),
    "right": ("on the right", "at the right side", "right", "on the right side", "at the right edge",
              "towards the right", "on the right-hand side", "close to the right"),
    "bottom left": ("in the bottom left corner", "at the lower left", "bottom left", "in the bottom left",
                    "lower-left", "bottom-left", "at the bottom left",
                    "towards the bottom left", "in the bottom-left area", "close to the bottom left"),
    "bottom": ("at the bottom", "at the bottom edge", "bottom", "at the bottom center", "bottom center",
               "at the bottom middle",
               "towards the bottom", "in the lower part", "close to the bottom"),
    "bottom right": ("in the bottom right corner", "at the lower right", "bottom right", "in the bottom right",
                     "lower-right", "bottom-right", "at the bottom right",
                     "towards the bottom right", "in the bottom-right area", "close to the bottom right"),
}
BACKGROUND_PHRASES = ("on a {} background", "on {}", "against a {} background", "over a {} background",
                      "with a {} background", "on a plain {} background", "on a {} canvas", "on a {} surface")
SINGLE_TEMPLATES = (
    "{obj} {position} {background}",
    "{obj} {background} {position}",
    "{position}, {obj} {background}",
    "an image of {obj} {position} {background}",
    "a picture of {obj} {background}, {position}",
    "{obj}, {position}, {background}",
    "there is {obj} {position} {background}",
    # requests, as people type them to an image generator
    "draw {obj} {position} {background}", "show me {obj} {position} {background}",
    "generate {obj} {background} {position}", "can you draw {obj} {position} {background}",
    "paint {obj} {position} {background}", "i would like {obj} {position} {background}",
    "create an image of {obj} {position} {background}", "a photo of {obj} {position} {background}",
    "we see {obj} {background} {position}", "give me {obj} {position} {background}",
)
HELDOUT_SIZE_WORDS = {"small": ("miniature",), "large": ("huge", "giant")}
HELDOUT_POSITION_PHRASES = {
    "top left": ("near the top left", "up in the top left", "in the upper left corner"),
    "top": ("near the top", "up at the top", "along the top"),
    "top right": ("near the top right", "up in the top right", "in the upper right corner"),
    "left": ("near the left", "over on the left", "at the left"),
    "center": ("dead center", "at the center of the picture", "smack in the middle"),
    "right": ("near the right", "over on the right", "at the right"),
    "bottom left": ("near the bottom left", "down in the bottom left", "in the lower left corner"),
    "bottom": ("near the bottom", "down at the bottom", "along the bottom"),
    "bottom right": ("near the bottom right", "down in the bottom right", "in the lower right corner"),
}
HELDOUT_BACKGROUND_PHRASES = ("on a {} backdrop", "set against {}", "in front of a {} wall")
HELDOUT_TEMPLATES = (
    "please draw {obj} {position} {background}",
    "could you paint {obj} {position} {background}",
    "i want to see {obj} {background} {position}",
    "make me {obj} {position} {background}",
    "here we have {obj} {position} {background}",
)
PHRASINGS = ("train", "heldout")
ATTRIBUTE_NAMES = ("shape", "colour", "size", "position", "background")
# How often a single-object caption leaves an attribute out; the shape is always named.
OMIT_PROBABILITY = {"colour": 0.1, "size": 0.25, "position": 0.15, "background": 0.25}
RELATION_PHRASES = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
PAIR_TEMPLATES = (
    "{a} {relation} {b} on a {background} background",
    "{a} {relation} {b}, {background} background",
    "a {background} background with {a} {relation} {b}",
    "an image of {a} {relation} {b} against a {background} background",
)

SUPERSAMPLE = 4  # draw at 4x the resolution, then box-filter down: anti-aliased edges


def _normalised(points: np.ndarray) -> np.ndarray:
    """Centre an outline's bounding box on the origin and scale its larger half-extent to 1."""
    centre = (points.max(0) + points.min(0)) / 2
    points = points - centre
    return points / np.abs(points).max()


def _outlines() -> dict[str, np.ndarray]:
    """Unit outlines (y pointing down, within [-1, 1]^2) as (N, 2) polygons."""
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    square = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.85  # ~ the circle's area
    triangle = np.array([[0, -1], [1, 0.8], [-1, 0.8]])
    angles = -math.pi / 2 + np.arange(10) * math.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    star = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    # The classic heart curve: x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t.
    heart = np.stack([16 * np.sin(t) ** 3,
                      -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1)
    diamond = np.array([[0, -1], [0.65, 0], [0, 1], [-0.65, 0]])
    outlines = dict(circle=circle, square=square, triangle=triangle, star=star, heart=heart,
                    diamond=diamond)
    return {name: _normalised(p) * (0.85 if name == "square" else 1.0) for name, p in outlines.items()}


_OUTLINES = _outlines()


def scene_objects(attributes: dict) -> list[dict]:
    """The objects of a scene, whether it holds one (flat attributes) or two (``objects``)."""
    return attributes["objects"] if "objects" in attributes else [attributes]


def render_scene(attributes: dict, image_size: int = 64) -> torch.Tensor:
    """Draw a scene. Returns a float tensor (3, image_size, image_size) in [-1, 1].

    Pure function of its arguments: the same attributes always give the same image.
    """
    canvas = image_size * SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), BACKGROUNDS[attributes["background"]])
    draw = ImageDraw.Draw(image)
    cell = canvas / 3
    for obj in scene_objects(attributes):
        row, col = divmod(POSITIONS.index(obj["position"]), 3)
        centre = np.array([(col + 0.5) * cell, (row + 0.5) * cell])
        points = centre + _OUTLINES[obj["shape"]] * SIZES[obj["size"]] * cell
        draw.polygon([tuple(p) for p in points.tolist()], fill=COLOURS[obj["colour"]])
    return from_pil(image.resize((image_size, image_size), Image.BOX))


def _positions_for(relation: str, rng: random.Random) -> tuple[str, str]:
    """Grid cells of two objects, sharing a row or a column, such that the first is `relation` the second."""
    line = rng.randrange(3)
    near, far = sorted(rng.sample(range(3), 2))
    first, second = (near, far) if relation in ("left of", "above") else (far, near)
    if relation in ("left of", "right of"):  # same row, different columns
        return POSITIONS[line * 3 + first], POSITIONS[line * 3 + second]
    return POSITIONS[first * 3 + line], POSITIONS[second * 3 + line]


def sample_attributes(rng: random.Random, split: str = "train", difficulty: str = "single") -> dict:
    """Draw a scene's attributes (see the module docstring for their layout).

    split: "train" never uses a pair of ``HELDOUT_PAIRS``; "heldout" always uses at least one.
    difficulty: "single" gives one object; "relations" gives two objects half of the time.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown Shapes split {split!r}: use one of {', '.join(SPLITS)}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown Shapes difficulty {difficulty!r}: use one of {', '.join(DIFFICULTIES)}")
    background = rng.choice(tuple(BACKGROUNDS))
    if difficulty == "single" or rng.random() < 0.5:
        shape, colour = rng.choice(_PAIRS[split])
        return {"shape": shape, "colour": colour, "size": rng.choice(tuple(SIZES)),
                "position": rng.choice(POSITIONS), "background": background}
    if split == "train":
        pairs = [rng.choice(_PAIRS["train"]), rng.choice(_PAIRS["train"])]
    else:  # one held-out object, the other anything, in either order
        pairs = [rng.choice(_PAIRS["heldout"]), rng.choice(_ALL_PAIRS)]
        rng.shuffle(pairs)
    relation = rng.choice(RELATIONS)
    positions = _positions_for(relation, rng)
    objects = [{"shape": shape, "colour": colour, "size": rng.choice(tuple(SIZES)), "position": position}
               for (shape, colour), position in zip(pairs, positions, strict=True)]
    return {"objects": objects, "relation": relation, "background": background}


def _merged(*tables: dict) -> dict:
    return {key: tuple(dict.fromkeys(w for table in tables for w in table.get(key, ()))) for key in tables[0]}


def caption_for(attributes: dict, rng: random.Random | None = None, phrasing: str = "train") -> str:
    """A caption of the scene, drawn with `rng`; the canonical phrasing (first template, first
    words, every attribute stated) when `rng` is None.

    A one-object caption may leave out its colour, size, position or background (OMIT_PROBABILITY);
    `make_scene` records which it names. phrasing: "train", or "heldout" for a template never used
    in training and words from both sets (HELDOUT_*).
    """
    return _describe(attributes, rng, phrasing)[0]


def _describe(attributes: dict, rng: random.Random | None, phrasing: str,
              omit: bool = True) -> tuple[str, tuple[str, ...]]:
    """(caption, the attributes it states) of a scene; omit=False states all five."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"unknown Shapes phrasing {phrasing!r}: use one of {', '.join(PHRASINGS)}")
    if "objects" in attributes:
        return _pair_caption(attributes, rng), ATTRIBUTE_NAMES
    stated = _stated(rng)  # drawn either way, so that `omit` changes no other word of the caption
    if not omit:
        stated = ATTRIBUTE_NAMES
    pick = (lambda options: options[0]) if rng is None else rng.choice
    heldout = phrasing == "heldout"
    sizes = _merged(SIZE_WORDS, HELDOUT_SIZE_WORDS) if heldout else SIZE_WORDS
    positions = _merged(POSITION_PHRASES, HELDOUT_POSITION_PHRASES) if heldout else POSITION_PHRASES
    backgrounds = BACKGROUND_PHRASES + HELDOUT_BACKGROUND_PHRASES if heldout else BACKGROUND_PHRASES
    words = [pick(sizes[attributes["size"]]) if "size" in stated else "",
             pick(COLOUR_WORDS[attributes["colour"]]) if "colour" in stated else "",
             pick(SHAPE_WORDS[attributes["shape"]])]
    parts = {
        "obj": with_article(" ".join(w for w in words if w)),
        "position": pick(positions[attributes["position"]]) if "position" in stated else "",
        "background": (pick(backgrounds).format(pick(BACKGROUND_WORDS[attributes["background"]]))
                       if "background" in stated else ""),
    }
    template = pick(HELDOUT_TEMPLATES if heldout else SINGLE_TEMPLATES)
    return _tidy(template.format(**parts)), stated


def _stated(rng: random.Random | None) -> tuple[str, ...]:
    """The attributes a one-object caption names: all of them without a generator."""
    if rng is None:
        return ATTRIBUTE_NAMES
    draws = {name: rng.random() for name in OMIT_PROBABILITY}
    return tuple(n for n in ATTRIBUTE_NAMES if n not in draws or draws[n] >= OMIT_PROBABILITY[n])


def _phrase_pattern(table: dict) -> "re.Pattern":
    """A regex matching any phrase of the table, longest first, between word boundaries."""
    phrases = sorted({p for options in table.values() for p in options}, key=len, reverse=True)
    return re.compile(r"(?<![\w-])(" + "|".join(re.escape(p) for p in phrases) + r")(?![\w-])")


def read_caption(caption: str) -> dict:
    """Read a one-object caption back: {attribute: value, or None where the caption leaves it out}.

    The inverse of `caption_for` for either phrasing, whatever it leaves out.
    """
    tables = {
        "shape": SHAPE_WORDS, "colour": COLOUR_WORDS,
        "size": _merged(SIZE_WORDS, HELDOUT_SIZE_WORDS),
        "position": _merged(POSITION_PHRASES, HELDOUT_POSITION_PHRASES),
        "background": BACKGROUND_WORDS,
    }
    found = {}
    for name, table in tables.items():  # object colours and background colours share no word
        matches = _phrase_pattern(table).findall(caption)
        values = {value for value, options in table.items() for m in matches if m in options}
        if len(values) > 1:
            raise ValueError(f"caption {caption!r} names several {name}s: {sorted(values)}")
        found[name] = values.pop() if values else None
    return found


def _tidy(text: str) -> str:
    """Collapse the spaces and commas that a left-out part leaves behind."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",\s*,", ",", text)
    return text.strip(" ,")


def _pair_caption(attributes: dict, rng: random.Random | None) -> str:
    """A two-object caption: both objects' size, colour and shape, their relation, the background."""
    pick = (lambda options: options[0]) if rng is None else rng.choice

    def describe(obj: dict) -> str:
        words = (pick(SIZE_WORDS[obj["size"]]), pick(COLOUR_WORDS[obj["colour"]]), pick(SHAPE_WORDS[obj["shape"]]))
        return with_article(" ".join(words))

    background = pick(BACKGROUND_WORDS[attributes["background"]])
    a, b = attributes["objects"]
    relation = attributes["relation"]
    if rng is not None and rng.random() < 0.5:  # the same scene seen from the other object
        a, b, relation = b, a, INVERSE_RELATION[relation]
    return pick(PAIR_TEMPLATES).format(a=describe(a), b=describe(b), background=background,
                                       relation=pick(RELATION_PHRASES[relation]))


def make_scene(index: int, seed: int = 0, split: str = "train", difficulty: str = "single",
               phrasing: str = "train", omit: bool = True) -> tuple[str, dict]:
    """The (caption, attributes) of scene `index`: a pure function of its arguments.

    A one-object scene's attributes carry "stated", the attributes its caption names (a judge
    scores only those). The phrasing changes the caption, not the scene; omit=False names every
    attribute (the caption is otherwise the same words).
    """
    rng = random.Random(f"shapes/{seed}/{split}/{difficulty}/{index}")
    attributes = sample_attributes(rng, split, difficulty)
    caption, stated = _describe(attributes, rng, phrasing, omit)
    if "objects" not in attributes:
        attributes["stated"] = list(stated)
    return caption, attributes


def heldout_prompts(n: int, seed: int = 0, difficulty: str = "single") -> list[tuple[str, dict]]:
    """`n` (caption, attributes) pairs from the held-out split, for sampling and judging."""
    return [make_scene(i, seed, "heldout", difficulty) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """Settings of a ShapesDataset.

    length: number of samples (any; scenes are drawn independently per index).
    image_size: side in pixels of the rendered images.
    seed: with the index, fixes each scene and its caption.
    split: "train", or "heldout" for scenes made of held-out (shape, colour) pairs.
    difficulty: "single" (one object) or "relations" (half the scenes with two objects).
    phrasing: "train", or "heldout" for captions in phrasings that training never sees.
    omit: whether a caption may leave attributes out (OMIT_PROBABILITY); False names all five (the
    layout stage of the progressive recipe, `mdm_lite.recipe`).
    """

    length: int = 10_000
    image_size: int = 64
    seed: int = 0
    split: str = "train"
    difficulty: str = "single"
    phrasing: str = "train"
    omit: bool = True

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"Shapes length must be at least 1, got {self.length}")
        if self.image_size < 8:
            raise ValueError(f"Shapes image_size must be at least 8 pixels, got {self.image_size}")
        if self.split not in SPLITS:
            raise ValueError(f"unknown Shapes split {self.split!r}: use one of {', '.join(SPLITS)}")
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"unknown Shapes difficulty {self.difficulty!r}: use one of {', '.join(DIFFICULTIES)}")
        if self.phrasing not in PHRASINGS:
            raise ValueError(f"unknown Shapes phrasing {self.phrasing!r}: use one of {', '.join(PHRASINGS)}")


class ShapesDataset(torch.utils.data.Dataset):
    """Captioned shape scenes, rendered when indexed.

    ``ShapesDataset(length=1000, difficulty="relations")`` or ``ShapesDataset(ShapesConfig(...))``.
    Item: {"image": (3, S, S) float in [-1, 1], "caption": str, "attributes": dict}.
    """

    def __init__(self, config: ShapesConfig | None = None, **overrides):
        self.config = dataclasses.replace(config or ShapesConfig(), **overrides)

    def __len__(self) -> int:
        return self.config.length

    def scene(self, index: int) -> tuple[str, dict]:
        """(caption, attributes) of item `index`, without rendering it."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a ShapesDataset of length {len(self)}")
        c = self.config
        return make_scene(index, c.seed, c.split, c.difficulty, c.phrasing, c.omit)

    def __getitem__(self, index: int) -> dict:
        caption, attributes = self.scene(index)
        return {"image": render_scene(attributes, self.config.image_size), "caption": caption,
                "attributes": attributes}
