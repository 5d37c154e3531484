"""``intransitive``: a move game whose gold preference has cycles (no reward can represent it).

Prompt ``move against bo :``; response: one move and a few style words, e.g.
`` paper boldly calmly .``

Every response falls into a class: the move it names (``rock``, ``scissors``, ``paper`` for
K = 3; rock-paper-scissors-lizard-spock for K = 5; RPS-7 for K = 7), or ``invalid`` (no move,
or two different moves). The gold preference P*(a ≻ b) is

- across classes, the cyclic matrix of the game: each move beats the next ⌊K/2⌋ moves in
  the cycle with probability ½ + s/2 (s = ``strength``), loses to the previous ones with
  ½ − s/2; ``invalid`` loses to every move;
- inside a class, the Bradley-Terry preference σ(``task.bt_beta`` · (q(a) − q(b))) of the
  response's *quality* q, its gold reward: (distinct style words, at most 2, + 1 for a final
  ``.``) / 3, minus 0.25 per word outside the task's vocabulary; invalid responses score -1.

So ``gold_reward`` is only the transitive, within-class part; the class part is a game
(:meth:`class_game`) whose unregularised Nash equilibrium is uniform over the moves. The
demonstration policy picks moves with ``class_probs`` (default 0.4 / 0.4 / 0.2 over rock,
scissors, paper): rock beats scissors, and pairs of those two common moves dominate the
preference data, so a Bradley-Terry reward model fitted on it ranks rock first (by about 0.4
over paper, in the population fit) and a policy that maximises it collapses onto rock, which
paper exploits; the β-regularised equilibrium of the game stays mixed (for β = 0.1, with the
demonstrations as reference: 0.38 / 0.30 / 0.32, exploitability 0.04 against 0.10 for the
demonstrations). Preference pairs are labelled by sampling P* (with ``task.label_noise``).

Options: ``class_probs`` ([0.4, 0.4, 0.2]; its length K in {3, 5, 7} is the number of
moves), ``strength`` (1.0), ``invalid_rate`` (0.1: the share of malformed responses among
those the annotator compares, so that judges learn that they lose).
"""
from __future__ import annotations

import dataclasses
import random
from typing import List, Sequence

from pipeline.data.records import PreferenceExample
from pipeline.tasks.base import TASKS, ClassGame, Task, _sigmoid, split_seed

#: move cycles in which each move beats the next ⌊K/2⌋ (real games: RPS, RPSLS, RPS-7)
CYCLES = {
    3: ["rock", "scissors", "paper"],
    5: ["rock", "scissors", "lizard", "paper", "spock"],
    7: ["rock", "fire", "scissors", "sponge", "paper", "air", "water"],
}
ALL_MOVES = sorted({m for ms in CYCLES.values() for m in ms})
STYLE = ["boldly", "calmly", "quickly", "proudly", "gently", "wisely"]
OPPONENTS = ["ana", "bo", "cy", "dee", "eli", "fay", "gus", "hal", "ivy", "jo", "kai", "lu", "max", "ned"]
VOCABULARY = frozenset(ALL_MOVES + STYLE + ["."])
INVALID = "invalid"


@dataclasses.dataclass
class IntransitiveOptions:
    #: the demonstration policy's move distribution; its length K (3, 5 or 7) is the number of moves
    class_probs: List[float] = dataclasses.field(default_factory=lambda: [0.4, 0.4, 0.2])
    #: s in (0, 1]: a move beats the next ones in the cycle with probability 1/2 + s/2
    strength: float = 1.0
    #: share of malformed responses (no move, or two moves) among those the annotator compares, as
    #: in data sampled from an imperfect model: judges learn that they lose
    invalid_rate: float = 0.1


def cyclic_matrix(k: int, strength: float) -> list[list[float]]:
    """(K+1) x (K+1) class preference: generalised rock-paper-scissors over K moves (move i beats
    the next ⌊K/2⌋), plus an ``invalid`` class that loses to every move."""
    m = [[0.5] * (k + 1) for _ in range(k + 1)]
    for i in range(k):
        for j in range(k):
            d = (j - i) % k
            if 1 <= d and 2 * d < k:
                m[i][j] = 0.5 + strength / 2
            elif 2 * d > k:
                m[i][j] = 0.5 - strength / 2
        m[i][k], m[k][i] = 1.0, 0.0
    return m


@TASKS.register("intransitive")
class IntransitiveTask(Task):
    name = "intransitive"
    Options = IntransitiveOptions

    def __init__(self, cfg):
        super().__init__(cfg)
        from pipeline.errors import ConfigError

        probs = [float(p) for p in self.options.class_probs]
        if len(probs) not in CYCLES or any(p < 0 for p in probs) or sum(probs) <= 0:
            raise ConfigError(f"must be {sorted(CYCLES)} non-negative weights (one per move), got {probs}",
                              where="task.options.class_probs", fix="e.g. [0.4, 0.4, 0.2]")
        if not 0 < float(self.options.strength) <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.options.strength}", where="task.options.strength")
        if not 0 <= float(self.options.invalid_rate) < 1:
            raise ConfigError(f"must be in [0, 1), got {self.options.invalid_rate}", where="task.options.invalid_rate")
        total = sum(probs)
        self.class_probs = [p / total for p in probs]
        self.moves = CYCLES[len(probs)]
        self.matrix = cyclic_matrix(len(self.moves), float(self.options.strength))
        self.p_style = 0.3 + 0.4 * float(cfg.demo_quality)

    # ------------------------------------------------------------------ data
    def make_prompt(self, rng: random.Random) -> dict:
        return {"prompt": f"move against {rng.choice(OPPONENTS)} :"}

    def demonstrate(self, row: dict, rng: random.Random) -> str:
        move = rng.choices(self.moves, weights=self.class_probs)[0]
        words = [move] + [rng.choice(STYLE) for _ in range(2) if rng.random() < self.p_style]
        if rng.random() < 0.7:
            words.append(".")
        return " " + " ".join(words)

    def annotation_candidate(self, row: dict, rng: random.Random) -> str:
        """A demonstration, or with probability ``invalid_rate`` a malformed one (its move dropped, or a
        second move added)."""
        text = self.demonstrate(row, rng)
        if rng.random() >= float(self.options.invalid_rate):
            return text
        words = text.split()
        if rng.random() < 0.5:
            return " " + " ".join(words[1:] or ["."])
        return " " + " ".join(words[:1] + [rng.choice([m for m in self.moves if m != words[0]])] + words[1:])

    def corpus(self) -> list[str]:
        rng = random.Random(split_seed(self.cfg.seed, "corpus"))
        lines = [f"move against {o} :" for o in OPPONENTS] + [" " + " ".join(ALL_MOVES + STYLE) + " ."]
        for row in self.prompts("corpus", 400):
            lines.append(row["prompt"] + self.demonstrate(row, rng))
        return lines

    # ------------------------------------------------------------------ gold
    def classify(self, prompts: Sequence[str], completions: Sequence[str]) -> list[int]:
        """Class index of each completion: its move (0..K-1), or K (invalid)."""
        out = []
        for c in completions:
            named = {w for w in c.split() if w in ALL_MOVES}
            out.append(self.moves.index(named.pop()) if len(named) == 1 and named <= set(self.moves)
                       else len(self.moves))
        return out

    def gold_reward(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Quality (the within-class, transitive part): (distinct style words, at most 2, + final ".") / 3,
        minus 0.25 per word outside the vocabulary; -1 for invalid responses."""
        classes = self.classify(prompts, completions)
        out = []
        for c, k in zip(completions, classes):
            if k == len(self.moves):
                out.append(-1.0)
                continue
            words = c.split()
            style = len({w for w in words if w in STYLE})
            q = (min(style, 2) + (1 if words and words[-1] == "." else 0)) / 3.0
            out.append(q - 0.25 * sum(1 for w in words if w not in VOCABULARY))
        return out

    def gold_preference(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Cyclic across classes (:meth:`class_game`), Bradley-Terry on quality inside a class."""
        ca, cb = self.classify(prompts, a), self.classify(prompts, b)
        ga, gb = self.gold_reward(prompts, a), self.gold_reward(prompts, b)
        return [self.matrix[i][j] if i != j else _sigmoid(self.cfg.bt_beta * (x - y))
                for i, j, x, y in zip(ca, cb, ga, gb)]

    def class_game(self) -> ClassGame:
        return ClassGame(names=list(self.moves) + [INVALID], matrix=[list(r) for r in self.matrix],
                         classify=self.classify)

    def eval_subset(self, prompt: str, a: str, b: str) -> str:
        ca, cb = self.classify([prompt] * 2, [a, b])
        return "cross_class" if ca != cb else "same_class"

    def eval_pairs(self) -> list[PreferenceExample]:
        """Demonstration pairs (``cross_class`` / ``same_class``) plus, per prompt, a pair of two
        distinct moves (``cycle``: every edge of the cycle gets tested) and a demonstration against a
        malformed response (``invalid``)."""
        pairs = super().eval_pairs()
        rng = random.Random(split_seed(self.cfg.seed, "eval_pairs:cycle"))
        for row in self.prompts("eval"):
            i, j = rng.sample(range(len(self.moves)), 2)
            a, b = f" {self.moves[i]} .", f" {self.moves[j]} ."
            if self.matrix[i][j] != 0.5:
                chosen, rejected = (a, b) if self.matrix[i][j] > 0.5 else (b, a)
                pairs.append(PreferenceExample(row["prompt"], chosen, rejected, subset="cycle"))
            good = self.demonstrate(row, rng)
            bad = " " + " ".join(good.split()[1:] or ["."]) if rng.random() < 0.5 else f" {self.moves[i]} {self.moves[j]} ."
            pairs.append(PreferenceExample(row["prompt"], good, bad, subset="invalid"))
        return pairs
