"""EDA text augmentation (Wei & Zou 2019, "Easy Data Augmentation"), as DeCLIP uses it for its second
caption view: one operation per caption, chosen at random among those available.

- random swap: swap two words, ``n`` times;
- random deletion: drop each word with probability ``alpha`` (at least one word is kept);
- random insertion: insert ``n`` words at random positions — a WordNet synonym of a random word when
  WordNet is available, else a copy of a random word of the caption;
- synonym replacement: replace ``n`` words by a WordNet synonym — only when NLTK and its WordNet data
  are installed (``pip install nltk`` and ``python -m nltk.downloader wordnet``); it is left out otherwise.

``n = max(1, round(alpha * words))``. Randomness comes from the ``rng`` given (default: Python's
``random`` module, which the training loop seeds and checkpoints).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

STOP_WORDS = frozenset(
    "a an the of in on at to for from by with and or but is are was were be been it its this that these those "
    "as into onto over under i me my we our you your he him his she her they them their".split()
)


@functools.lru_cache(maxsize=1)
def _wordnet():
    """NLTK's WordNet corpus reader, or None when NLTK or its data is missing."""
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("dog")  # raises LookupError when the data is not downloaded
        return wordnet
    except (ImportError, LookupError, OSError):
        return None


def has_wordnet() -> bool:
    return _wordnet() is not None


def synonyms(word: str) -> list[str]:
    wn = _wordnet()
    if wn is None:
        return []
    found = {lemma.name().replace("_", " ").lower() for syn in wn.synsets(word) for lemma in syn.lemmas()}
    found.discard(word.lower())
    return sorted(found)


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    words = list(words)
    if len(words) < 2:
        return words
    for _ in range(n):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return words


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() >= p]
    return kept or [rng.choice(words)]


def random_insertion(words: list[str], n: int, rng: random.Random) -> list[str]:
    words = list(words)
    if not words:
        return words
    for _ in range(n):
        source = rng.choice(words)
        candidates = synonyms(source)
        words.insert(rng.randint(0, len(words)), rng.choice(candidates) if candidates else source)
    return words


def synonym_replacement(words: list[str], n: int, rng: random.Random) -> list[str]:
    words = list(words)
    positions = [i for i, w in enumerate(words) if w.lower() not in STOP_WORDS and synonyms(w)]
    rng.shuffle(positions)
    for i in positions[:n]:
        words[i] = rng.choice(synonyms(words[i]))
    return words


def operations() -> dict[str, Callable[[list[str], float, random.Random], list[str]]]:
    """The operations available on this machine: ``name -> fn(words, alpha, rng)``."""
    def count(words: list[str], alpha: float) -> int:
        return max(1, round(alpha * len(words)))

    ops = {
        "swap": lambda w, a, r: random_swap(w, count(w, a), r),
        "delete": lambda w, a, r: random_deletion(w, a, r),
        "insert": lambda w, a, r: random_insertion(w, count(w, a), r),
    }
    if has_wordnet():
        ops["synonym"] = lambda w, a, r: synonym_replacement(w, count(w, a), r)
    return ops


def eda(text: str, alpha: float = 0.1, rng: random.Random | None = None) -> str:
    """``text`` changed by one EDA operation chosen at random (see the module docstring)."""
    rng = rng if rng is not None else random  # the module's generator: seeded and checkpointed by the loop
    words = text.split()
    if not words:
        return text
    ops = operations()
    op = ops[rng.choice(sorted(ops))]
    return " ".join(op(words, alpha, rng))


__all__ = ["eda", "has_wordnet", "operations", "random_deletion", "random_insertion", "random_swap",
           "synonym_replacement", "synonyms"]
