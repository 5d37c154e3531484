"""Canonical in-memory examples, independent of the file format they came from.

Every loader and built-in task produces these; tokenization (:mod:`pipeline.data.collate`)
consumes them. Texts are already rendered: conversational rows have had the chat
template applied, so ``prompt + completion`` is exactly the text the model sees.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SFTExample:
    """A demonstration. Language-modeling rows (``text``) have ``prompt=""``."""

    prompt: str
    completion: str
    #: where the row came from (``file:LINE``), for error messages; not part of equality
    where: str | None = field(default=None, compare=False, repr=False)


@dataclass
class PreferenceExample:
    """A preference pair: ``prompt + chosen`` is preferred over ``prompt + rejected``.

    ``margin`` is an optional preference strength (e.g. a rating difference);
    ``subset`` groups pairs for per-subset metrics (RewardBench style).
    """

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    subset: str = "default"
    #: where the row came from (``file:LINE``), for error messages; not part of equality
    where: str | None = field(default=None, compare=False, repr=False)
