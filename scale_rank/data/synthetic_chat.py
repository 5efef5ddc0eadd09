"""Instruction data the package generates itself (no download): word-list tasks with one exact answer.

Each record is {"messages": [user, assistant]}: reverse, sort, or repeat the last of a few words; the answer
is fully determined by the prompt, so a causal LM's loss on responses falls as it learns the rules.
"""
from __future__ import annotations

import random

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "forest", "candle", "mirror",
         "garden", "rocket", "silver", "window", "pepper", "castle", "bridge", "planet", "violin", "harbor"]
TASKS = {
    "Reverse the words: {words}": lambda words: " ".join(reversed(words)),
    "Sort the words alphabetically: {words}": lambda words: " ".join(sorted(words)),
    "Repeat the last word twice: {words}": lambda words: f"{words[-1]} {words[-1]}",
}


def generate(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(3, 5))
        template, answer = rng.choice(list(TASKS.items()))
        records.append({"messages": [{"role": "user", "content": template.format(words=" ".join(words))},
                                     {"role": "assistant", "content": answer(words)}]})
    return records


def splits(train_size: int, eval_size: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    return generate(train_size, seed * 2 + 1), generate(eval_size, seed * 2 + 2)
