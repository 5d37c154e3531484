"""Standalone copy of the ``lexicon`` task's gold reward (pipeline/tasks/lexicon.py).

The TRL venvs (bench/.venv-trl116, bench/.venv-trl112) do not install the project:
importing ``pipeline.tasks`` pulls ``pipeline.data`` and with it torch collators,
and the project's own deps (lightning, hydra, ...) are not there. So the scoring
logic is copied here, stdlib only. ``bench/common.py export`` (run in the project
venv) checks that this copy and ``LexiconTask.gold_reward`` agree on the SFT model's
samples and on hand-written edge cases, and refuses to export if they differ.

Default options (``max_words=14``, ``repeat_penalty=0.4``) as in the task config.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

TOPICS = [
    "pizza", "movie", "hotel", "phone", "book", "concert", "coffee", "garden", "train",
    "museum", "laptop", "beach", "bakery", "game", "park", "show", "bike", "camera",
    "salad", "album", "shop", "class", "flight", "market",
]
ASPECTS = ["staff", "price", "service", "view", "room", "music", "food", "screen", "story", "design", "seat", "sound"]
POSITIVE = {
    "great": 1.0, "excellent": 1.0, "perfect": 0.9, "lovely": 0.8, "friendly": 0.7, "tasty": 0.6,
    "fun": 0.6, "fresh": 0.5, "good": 0.5, "clean": 0.5, "nice": 0.4, "bright": 0.4, "cozy": 0.6,
    "fast": 0.5, "charming": 0.7,
}
NEGATIVE = {
    "awful": -1.0, "broken": -0.9, "rude": -0.8, "boring": -0.7, "dirty": -0.7, "bland": -0.6,
    "bad": -0.6, "slow": -0.5, "noisy": -0.5, "cold": -0.4, "dull": -0.5, "pricey": -0.4,
    "messy": -0.6, "late": -0.5, "weak": -0.5,
}
NEUTRAL = ["ok", "plain", "normal", "usual", "fine"]
LEXICON = {**POSITIVE, **NEGATIVE}
CONNECTIVES = ["the", "was", "and", "but", "it", "very", "quite", "really", "."]
VOCABULARY = frozenset(TOPICS + ASPECTS + list(LEXICON) + NEUTRAL + CONNECTIVES)
_PROMPT_RE = re.compile(r"review of the (\w+)")


def gold_one(prompt: str, completion: str, max_words: int = 14, repeat_penalty: float = 0.4) -> float:
    words = completion.split()
    seen: set[str] = set()
    score, repeats = 0.0, 0
    for w in words:
        if w in LEXICON:
            if w in seen:
                repeats += 1
            else:
                seen.add(w)
                score += LEXICON[w]
    gold = 2.0 * math.tanh(score / 2.0)
    m = _PROMPT_RE.search(prompt)
    topic = m.group(1) if m else None
    if topic and topic in words:
        gold += 0.5
    if words and words[-1] == ".":
        gold += 0.3
    gold -= repeat_penalty * repeats
    gold -= min(1.0, 0.1 * sum(1 for w in words if w not in VOCABULARY))  # gibberish
    gold -= 0.1 * max(0, len(words) - max_words)
    return float(gold)


def gold_reward(prompts: Sequence[str], completions: Sequence[str], **options) -> list[float]:
    return [gold_one(p, c, **options) for p, c in zip(prompts, completions)]
