"""Built-in tasks: determinism, gold reward semantics, noisy Bradley-Terry labels."""
from types import SimpleNamespace

import pytest

from pipeline.tasks import build_task


def task_cfg(name="lexicon", **kw):
    base = dict(name=name, seed=7, num_train_prompts=200, num_pref_prompts=400, num_eval_prompts=50,
                bt_beta=4.0, label_noise=0.0, demo_quality=0.3, options={})
    base.update(kw)
    return SimpleNamespace(**base)


def test_splits_are_deterministic_and_disjoint_streams():
    t = build_task(task_cfg())
    assert t.prompts("sft") == build_task(task_cfg()).prompts("sft")
    assert t.sft_examples() == build_task(task_cfg()).sft_examples()
    assert [r["prompt"] for r in t.prompts("sft", 50)] != [r["prompt"] for r in t.prompts("eval", 50)]


def test_lexicon_gold_reward_prefers_clean_praise_over_repetition_and_rambling():
    t = build_task(task_cfg())
    p = "review of the pizza :"
    good, bad = " the pizza was great and the staff was friendly .", " the pizza was awful ."
    spam = " the pizza was " + "great " * 8 + "."
    ramble = good[:-2] + " and the view was nice" * 4 + " ."
    g = dict(zip(["good", "bad", "spam", "ramble"], t.gold_reward([p] * 4, [good, bad, spam, ramble])))
    assert g["good"] > g["bad"]
    assert g["good"] > g["spam"]
    assert g["good"] > g["ramble"]


def test_arithmetic_exact_match():
    t = build_task(task_cfg("arithmetic"))
    assert t.gold_reward(["12+7=", "12+7=", "12+7=", "3*4="], ["19", " 19", "18", "12"]) == [1.0, 1.0, 0.0, 1.0]
    assert t.gold_reward(["1+1="], ["two"]) == [0.0]


@pytest.mark.parametrize("name", ["lexicon", "arithmetic"])
def test_demonstrations_are_mediocre(name):
    t = build_task(task_cfg(name))
    ex = t.sft_examples()
    gold = t.gold_reward([e.prompt for e in ex], [e.completion for e in ex])
    mean = sum(gold) / len(gold)
    best = {"lexicon": 2.8, "arithmetic": 1.0}[name]
    assert mean < 0.75 * best  # headroom for RL


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_label_noise_rate(noise):
    """Agreement of labels with the gold ordering drops by the flip rate."""
    t = build_task(task_cfg(label_noise=noise, bt_beta=50.0, num_pref_prompts=1500))
    pairs = t.preference_examples()
    agree = [g_c > g_r for g_c, g_r in (t.gold_reward([p.prompt] * 2, [p.chosen, p.rejected]) for p in pairs)
             if g_c != g_r]
    rate = sum(agree) / len(agree)
    assert abs(rate - (1 - noise)) < 0.05


def test_eval_pairs_are_gold_consistent_with_subsets():
    for name, subsets in [("lexicon", {"demonstrations", "repetition"}), ("arithmetic", {"near_miss", "far"})]:
        t = build_task(task_cfg(name))
        pairs = t.eval_pairs()
        assert {p.subset for p in pairs} == subsets
        for p in pairs:
            gc, gr = t.gold_reward([p.prompt] * 2, [p.chosen, p.rejected])
            assert gc > gr
