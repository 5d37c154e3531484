"""``arithmetic``: verifiable addition with an exact-match gold reward.

Prompt ``"17+25="``, response ``"42"``. Gold reward: 1.0 when the integer in the
response equals the sum, else 0.0 (non-numbers and trailing text count as wrong).
The demonstration policy answers correctly with probability ``0.3 + 0.5*demo_quality``
and otherwise is off by 1-3 (or swaps digits), so SFT leaves headroom for GRPO/RLOO.
Options: ``max_operand`` (9), ``operators`` ("+").
"""
from __future__ import annotations

import dataclasses
import random
import re
from typing import Sequence

from pipeline.data.records import PreferenceExample
from pipeline.tasks.base import TASKS, Task, split_seed

_PROMPT_RE = re.compile(r"(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclasses.dataclass
class ArithmeticOptions:
    #: operands are drawn from [0, max_operand]
    max_operand: int = 9
    #: any of ``+-*``
    operators: str = "+"


@TASKS.register("arithmetic")
class ArithmeticTask(Task):
    name = "arithmetic"
    Options = ArithmeticOptions

    def __init__(self, cfg):
        super().__init__(cfg)
        self.max_operand = int(self.options.max_operand)
        self.operators = str(self.options.operators)
        if not self.operators or set(self.operators) - set(_OPS):
            from pipeline.errors import ConfigError

            raise ConfigError(f"must be a non-empty string of {''.join(_OPS)}, got {self.operators!r}",
                              where="task.options.operators")
        self.p_correct = 0.3 + 0.5 * float(cfg.demo_quality)

    def make_prompt(self, rng: random.Random) -> dict:
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        op = rng.choice(self.operators)
        return {"prompt": f"{a}{op}{b}=", "answer": str(_OPS[op](a, b))}

    def demonstrate(self, row: dict, rng: random.Random) -> str:
        answer = int(row.get("answer") or solve(row["prompt"]))
        if rng.random() < self.p_correct:
            return str(answer)
        wrong = answer + rng.choice([-3, -2, -1, 1, 2, 3])
        return str(wrong)

    def gold_reward(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        out = []
        for p, c in zip(prompts, completions):
            target = solve(p)
            try:
                out.append(float(target is not None and int(c.strip()) == target))
            except ValueError:
                out.append(0.0)
        return out

    def corpus(self) -> list[str]:
        rng = random.Random(split_seed(self.cfg.seed, "corpus"))
        lines = [" ".join(str(i) for i in range(10)) + " + - * ="]
        for row in self.prompts("corpus", 500):
            lines.append(row["prompt"] + self.demonstrate(row, rng))
        return lines

    def eval_pairs(self) -> list[PreferenceExample]:
        """``near_miss`` (off by one) and ``far`` (off by 5-20) wrong answers vs the truth."""
        rng = random.Random(split_seed(self.cfg.seed, "eval_pairs"))
        pairs = []
        for row in self.prompts("eval"):
            ans = int(row["answer"])
            pairs.append(PreferenceExample(row["prompt"], str(ans), str(ans + rng.choice([-1, 1])), subset="near_miss"))
            pairs.append(PreferenceExample(row["prompt"], str(ans), str(ans + rng.randint(5, 20)), subset="far"))
        return pairs


def solve(prompt: str) -> int | None:
    m = _PROMPT_RE.search(prompt.strip())
    if not m:
        return None
    return _OPS[m.group(2)](int(m.group(1)), int(m.group(3)))
