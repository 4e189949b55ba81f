"""The built-in corpus: deterministic synthetic product reviews, so training needs no download.

The reviews are generated from a small grammar with a seeded RNG: star rating first, then
a summary and sentences whose wording follows the rating. That gives a character model
real structure to learn (words, punctuation, document boundaries) and gives the transfer
demo a real sentiment signal, while being byte-for-byte the same on every machine.
"""

from __future__ import annotations

import os
import random

from horovod_mlstm.records import MANIFEST, write_corpus

PRODUCTS = ["guitar", "bass", "amp", "tuner", "capo", "cable", "pedal", "strap", "pick set",
            "keyboard", "microphone", "mic stand", "drum kit", "ukulele", "violin", "string set",
            "headphones", "audio interface", "metronome", "gig bag"]
BRANDS = ["Fender", "Yamaha", "Boss", "Ernie Ball", "Shure", "Roland", "Gibson", "Snark",
          "Dunlop", "Korg", "Casio", "Behringer", "Ibanez", "D'Addario", "Planet Waves"]
POSITIVE = {
    "adj": ["great", "excellent", "solid", "fantastic", "reliable", "sturdy", "beautiful",
            "perfect", "wonderful", "impressive", "warm", "clear"],
    "verb": ["love", "recommend", "enjoy", "trust", "adore"],
    "summary": ["Great value", "Works perfectly", "Highly recommended", "Love it",
                "Exactly what I needed", "Five stars", "Excellent quality", "Best purchase this year"],
    "sentence": [
        "The {p} sounds {a} and stays in tune for weeks.",
        "I {v} this {p}; it was {a} right out of the box.",
        "Build quality is {a} and the finish looks {a}.",
        "For the price you cannot beat this {b} {p}.",
        "My teacher tried it and said it was {a}.",
        "Shipping was fast and the {p} arrived in {a} condition.",
        "It has held up to daily practice without a single problem.",
        "I would buy this {p} again without thinking twice.",
    ],
}
NEGATIVE = {
    "adj": ["terrible", "flimsy", "cheap", "awful", "noisy", "disappointing", "broken",
            "useless", "poor", "weak", "muddy", "harsh"],
    "verb": ["regret", "return", "avoid", "hate", "dislike"],
    "summary": ["Do not buy", "Broke in a week", "Very disappointed", "Waste of money",
                "Returned it", "One star", "Poor quality", "Not as described"],
    "sentence": [
        "The {p} sounds {a} and will not stay in tune.",
        "I {v} buying this {p}; it was {a} out of the box.",
        "Build quality is {a} and the finish started peeling.",
        "Even at this price the {b} {p} is not worth it.",
        "My teacher tried it and said it was {a}.",
        "The {p} arrived {a} and the box was crushed.",
        "It stopped working after a few days of practice.",
        "I would never buy this {p} again.",
    ],
}
NEUTRAL = ["I bought this {p} for my son who is learning to play.",
           "I have been playing for {n} years.",
           "This is my {o} {b} {p}.",
           "I use it at home and at church on Sundays.",
           "It came with a manual and a spare battery."]
ORDINALS = ["first", "second", "third", "fourth"]


def review(rng: random.Random) -> dict:
    """One review in the fields of McAuley's Amazon data (overall, summary, reviewText)."""
    stars = rng.choice([1, 2, 4, 5, 5])
    bank = POSITIVE if stars >= 4 else NEGATIVE
    product, brand = rng.choice(PRODUCTS), rng.choice(BRANDS)

    def fill(template):
        return template.format(p=product, b=brand, a=rng.choice(bank["adj"]), v=rng.choice(bank["verb"]),
                               n=rng.randint(2, 30), o=rng.choice(ORDINALS))

    sentences = [fill(s) for s in rng.sample(bank["sentence"], rng.randint(2, 5))]
    if rng.random() < 0.5:
        sentences.insert(rng.randint(0, len(sentences)), fill(rng.choice(NEUTRAL)))
    return {"overall": float(stars), "summary": rng.choice(bank["summary"]),
            "reviewText": " ".join(sentences)}


def reviews(count: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(count):
        yield review(rng)


def texts(count: int = 20000, seed: int = 0):
    """The texts that become the built-in corpus: "summary. review" per document."""
    for r in reviews(count, seed):
        yield f"{r['summary']}. {r['reviewText']}"


BUILTIN_REVIEWS = 20000


def prepare_builtin(output_dir: str) -> str:
    """Writes the built-in corpus once (about 5 MB); later calls find it and return.

    Safe for every rank to call at once: each stages its own copy and the first to publish
    wins; the others drop theirs (the corpus is deterministic, so the copies are identical).
    """
    if not os.path.exists(os.path.join(output_dir, MANIFEST)):
        write_corpus(texts(BUILTIN_REVIEWS), output_dir, num_shards=2, val_fraction=0.05, test_fraction=0.05,
                     extra_manifest={"formats": ["builtin"]}, replace=False)
    return output_dir
