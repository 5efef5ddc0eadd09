"""A sentiment task the package generates itself (no download): short reviews with negation.

Label 1 (positive) when the review's opinion word is positive and not negated, or negative and negated.
Negation makes the task need word order, so a frozen encoder plus a linear head does not solve it alone.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

POSITIVE = ["good", "great", "wonderful", "delightful", "brilliant", "charming", "moving", "superb",
            "enjoyable", "fantastic", "clever", "beautiful"]
NEGATIVE = ["bad", "awful", "boring", "dull", "terrible", "clumsy", "tedious", "weak", "painful",
            "bland", "forgettable", "messy"]
SUBJECTS = ["the film", "this movie", "the story", "the acting", "the script", "the ending", "the cast",
            "the soundtrack", "the director's work", "the plot", "the dialogue", "the pacing"]
TEMPLATES = ["{subject} was {neg}{word}.", "i thought {subject} was {neg}{word}.",
             "honestly, {subject} is {neg}{word}.", "{subject} felt {neg}{word} to me.",
             "everyone said {subject} was {neg}{word}, and it was."]
NEGATIONS = ["not ", "never ", "hardly "]


@dataclass(frozen=True)
class Example:
    text: str
    label: int


def generate(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        positive_word = rng.random() < 0.5
        negated = rng.random() < 0.4
        word = rng.choice(POSITIVE if positive_word else NEGATIVE)
        text = rng.choice(TEMPLATES).format(subject=rng.choice(SUBJECTS), word=word,
                                            neg=rng.choice(NEGATIONS) if negated else "")
        examples.append(Example(text, int(positive_word != negated)))
    return examples


def splits(train_size: int, eval_size: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Train and evaluation examples from independent streams of the same generator."""
    return generate(train_size, seed * 2 + 1), generate(eval_size, seed * 2 + 2)
