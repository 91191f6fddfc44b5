"""English glue shared by the caption writers: the indefinite article (chapter 1)."""

# Words that start with a vowel letter but a consonant sound ("a European", "a unicorn").
_CONSONANT_SOUND_PREFIXES = ("eu", "uni", "use", "one", "uk")


def with_article(phrase: str) -> str:
    """Prefix `phrase` with "a" or "an": "orange star" -> "an orange star", "goldfish" -> "a goldfish"."""
    lower = phrase.lower()
    vowel_sound = lower.startswith(tuple("aeiou")) and not lower.startswith(_CONSONANT_SOUND_PREFIXES)
    return ("an " if vowel_sound else "a ") + phrase
