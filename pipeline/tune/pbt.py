"""Population-based training of a stage's hyperparameter schedule: PBT (Jaderberg et al. 2017) and
PB2 (Parker-Holder et al. 2020). ``python -m pipeline.tune sweep=ppo_pbt``.

A sweep with a ``pbt:`` section (:class:`pipeline.tune.spec.PBTSettings`) trains ``population``
members of the pipeline side by side; the stage that the space's parameters change (an ``rl``
stage) trains in **segments** of ``segment_steps`` rollout steps. At the end of a segment every
member has its ranking score (``pbt.metric``, by default the first objective, read from the
stage's metrics at that step, optionally minus ``kl_penalty`` x ``kl_metric``); the bottom
``quantile`` of the population then **exploits** a member of the top ``quantile`` (copies its full
training state: the stage's mid-stage checkpoint of :mod:`pipeline.resume` with policy, optimizer,
critic, KL controller, RNG streams, data order and curve so far) and **explores** (new values of the
searched hyperparameters: PBT perturbs or resamples the copied values, PB2 asks a GP-UCB bandit,
:mod:`pipeline.tune.pb2`). Members at the top keep training unchanged.

**Schedules are configurations.** A member is its initial values plus a schedule of changes
(``rl.schedule``: ``[{step: 20, overrides: [algorithm.kl_coef=0.12, ...]}]``, applied by the stage at
step boundaries, :mod:`pipeline.modules.schedule`). Exploiting copies the partner's initial values and
schedule and appends the explored values at the current step. A segment is an ordinary pipeline run
of the member's configuration that its hook stops at the segment's last step (after the checkpoint
of that step is written); the next segment places the member's checkpoint where that run's stage
finds it (the resume directory of its fingerprint) and continues. Because resuming is exact, the
best member's final configuration, run as one plain pipeline (``experiment=<study>_schedule``, written
to the study directory), reproduces its curve and score on the same seed.

Study directory (besides what :mod:`pipeline.tune.outputs` describes for Optuna studies)::

    population.json             the population: settings, members (initial values, schedule, lineage,
                                per-segment values, scores and run directories), exploit/explore events,
                                the best member (written after every change: a killed study resumes
                                at the last completed segment)
    population.csv              one row per member and segment: step range, score, values, copied from
    <study>_schedule.yaml       the best member as an experiment preset (also experiment/<study>_schedule.yaml:
                                python -m pipeline --config-dir <study dir> experiment=<study>_schedule)
    summary.json                settings, budget (rollout steps), best member, its schedule, test seeds
    members/<id>/segment-<s>/   each segment's pipeline run
    checkpoints/<id>/seg-<s>/   each member's checkpoint at the end of its latest segment

Workers (``tune.n_workers``, or more processes on a shared filesystem) run the members' segments
in parallel, claiming them under the study lock; the segment boundary is synchronous.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import datetime as _dt
import io
import json
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, PipelineError, StopRun, TrainingError
from pipeline.registry import Registry
from pipeline.tune import pb2
from pipeline.tune import space as sp
from pipeline.tune.storage import WORKER_ID, _pid_alive
from pipeline.tune.study import MissingMetric, Tuner

log = logging.getLogger("pipeline.tune")

STATE, TABLE, SUMMARY = "population.json", "population.csv", "summary.json"
MEMBERS, CHECKPOINTS = "members", "checkpoints"


# ----------------------------------------------------------------------------- values
def _to_unit(p: sp.Param, v) -> float:
    lo, hi = float(p.low), float(p.high)
    if hi == lo:
        return 0.5
    if p.log:
        return (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return (float(v) - lo) / (hi - lo)


def _clip(p: sp.Param, v):
    v = min(max(v, p.low), p.high)
    if p.step is not None:
        v = p.low + round((v - p.low) / p.step) * p.step
        v = min(max(v, p.low), p.high)
    if p.kind == "int":
        return int(round(v))
    return float(round(v, 12))


def _from_unit(p: sp.Param, u: float):
    u = min(max(float(u), 0.0), 1.0)
    lo, hi = float(p.low), float(p.high)
    v = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if p.log else lo + u * (hi - lo)
    return _clip(p, v)


def _sample(p: sp.Param, rng: np.random.Generator):
    if p.kind == "categorical":
        return p.choices[int(rng.integers(len(p.choices)))]
    return _from_unit(p, rng.random())


# ----------------------------------------------------------------------------- explore
#: how the exploiting members' new values are chosen: fn(population, parent values, segment, rng) -> new values
EXPLORERS: Registry = Registry("PBT method")


@EXPLORERS.register("pbt")
def perturb(pop: "Population", parents: list[dict], segment: int, rng: np.random.Generator) -> list[dict]:
    """PBT: each number x a random ``perturb_factors`` entry (clipped to its range; an int moves at
    least by one), or, with ``resample_probability``, a fresh draw from its range; a categorical
    value moves to a neighbouring choice or, with that probability, is drawn afresh."""
    s = pop.p
    out = []
    for values in parents:
        new = {}
        for p in pop.params:
            v = values[p.key]
            if rng.random() < s.resample_probability:
                new[p.key] = _sample(p, rng)
            elif p.kind == "categorical":
                i = p.choices.index(v) + (1 if rng.random() < 0.5 else -1)
                new[p.key] = p.choices[min(max(i, 0), len(p.choices) - 1)]
            else:
                x = _clip(p, v * float(rng.choice(s.perturb_factors)))
                if p.kind == "int" and x == v:
                    x = _clip(p, v + (1 if rng.random() < 0.5 else -1))
                new[p.key] = x
        out.append(new)
    return out


@EXPLORERS.register("pb2")
def bandit(pop: "Population", parents: list[dict], segment: int, rng: np.random.Generator) -> list[dict]:
    """PB2: the numbers come from a GP-UCB bandit fitted on every completed segment's (values, time)
    -> score improvement (random candidates in the ranges, half of them near the parent's values);
    categorical values are explored as PBT does."""
    numeric = [p for p in pop.params if p.kind != "categorical"]
    base = perturb(pop, parents, segment, rng)  # categorical choices (and the fallback)
    if not numeric:
        return base
    x, y = pop.observations()
    n = pop.p.candidates
    cands = rng.random((n, len(numeric)))
    for k in range(n // 2):  # local candidates around the parents
        parent = parents[k % len(parents)]
        centre = np.array([_to_unit(p, parent[p.key]) for p in numeric])
        cands[k] = np.clip(centre + rng.normal(0, 0.1, len(numeric)), 0, 1)
    t_next = (segment + 1) / max(pop.segments - 1, 1)
    rows = np.hstack([cands, np.full((n, 1), t_next)])
    picks = pb2.choose(x, y, rows, len(parents), pop.p.ucb_kappa) if len(x) >= 2 else None
    if picks is None:
        return base
    for new, i in zip(base, picks):
        for j, p in enumerate(numeric):
            new[p.key] = _from_unit(p, cands[i, j])
    return base


# ----------------------------------------------------------------------------- segments
class SegmentEnd(StopRun):
    """The member's segment reached its last step (its checkpoint is written)."""


class SegmentHook:
    """The runner's hook during a segment: keeps the tuned stage's metrics and stops the run at ``stop``."""

    def __init__(self, stage: str, stop: int | None):
        self.stage, self.stop = stage, stop
        self.metrics: dict | None = None

    def __call__(self, stage: str, step: int, metrics: dict) -> None:
        if stage != self.stage or step < 0:
            return
        if self.stop is not None and step >= self.stop:
            self.metrics = {"step": step, **metrics}
            raise SegmentEnd(f"segment ends at step {step}")


def _link_tree(src: Path, dst: Path) -> None:
    """A copy of ``src`` at ``dst`` made of hard links where possible (checkpoint files are never
    rewritten in place: :mod:`pipeline.resume` writes new files and renames)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=link)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _ranking(task: dict) -> float:
    """A segment's score for ranking: a failed or non-finite one ranks last."""
    score = task.get("score") if task.get("state") == "done" else None
    return -math.inf if score is None else float(score)


class Population:
    """A PBT study: its checks against the pipeline, its state file and the workers' loop."""

    def __init__(self, tuner: Tuner):
        self.tuner, self.p, self.t = tuner, tuner.spec.pbt, tuner.t
        self.dir = tuner.study_dir
        self.seed = int(self.t.seeds[0])
        self.params = list(sp.walk(tuner.params))
        objective = tuner.objectives[0]
        self.metric = self.p.metric or objective.metric
        self.sign = 1.0 if objective.direction == "maximize" else -1.0
        EXPLORERS.get(self.p.method, key="pbt.method")
        self._check()

    # ------------------------------------------------------------------ checks
    def _check(self) -> None:
        from pipeline.run import plan

        stages = plan(self.tuner.base_cfg)
        loc = self.tuner.loc
        for p in self.params:
            if p.then or p.condition is not None or (p.kind == "categorical" and "." not in p.key):
                raise ConfigError(f"{p.key!r}: population-based training changes numbers and choices of one stage "
                                  "during training; conditional parameters and config groups cannot change mid-run",
                                  where=loc.where(p.path), fix="search those with an Optuna study")
        schedulable = [st for st in stages if st.cls.schedule_key]
        if self.p.stage is not None:
            chosen = [st for st in stages if st.name == self.p.stage]
            if not chosen:
                raise ConfigError(f"no stage {self.p.stage!r}; stages: {', '.join(s.name for s in stages)}",
                                  where="pbt.stage")
            if not chosen[0].cls.schedule_key:
                raise ConfigError(f"stage {self.p.stage!r} (kind {chosen[0].spec.kind}) cannot change its "
                                  "hyperparameters during training", where="pbt.stage",
                                  fix="population-based training needs a stage with a schedule (kind rl or nlhf)")
        else:
            chosen = [st for st in schedulable if st.name in self.tuner.seed_stages]
            if len(chosen) != 1:
                raise ConfigError(f"{'no stage' if not chosen else 'several stages'} with a schedule "
                                  f"({', '.join(s.name for s in chosen) or 'none of ' + ', '.join(self.tuner.stage_names)})"
                                  " take the searched settings", where="pbt.stage",
                                  fix="name the stage trained in segments: pbt.stage=<name>")
        st = chosen[0]
        others = [s.name for s in schedulable if s.spec.kind == st.spec.kind and s.name != st.name
                  and s.name in self.tuner.seed_stages]
        if others:  # the members' values and schedules are run-wide keys: they would change those stages too
            raise ConfigError(f"the searched settings also change stage(s) {', '.join(others)} (kind "
                              f"{st.spec.kind}), which would train with the members' schedules too",
                              where="pbt.stage", fix=f"use a pipeline with one {st.spec.kind} stage")
        self.stage, self.kind = st.name, st.spec.kind
        section = st.cls.schedule_key.split(".")[0]
        scfg = st.cfg[section]
        for p in self.params:
            if p.key not in st.cls.schedulable:
                raise ConfigError(f"{p.key!r} cannot change during training, so a population cannot explore it",
                                  where=loc.where(p.path),
                                  fix=f"search keys {st.spec.kind} stages can schedule: {', '.join(st.cls.schedulable)}")
        if scfg.schedule:
            raise ConfigError(f"{st.cls.schedule_key} is set in the base overrides; the population writes it",
                              where="base", fix=f"remove {st.cls.schedule_key} from the sweep's base and command line")
        self.total_steps = int(st.cls.total_steps(st.cfg))
        self.segments = math.ceil(self.total_steps / self.p.segment_steps)
        if self.segments < 2:
            raise ConfigError(f"stage {st.name} trains {self.total_steps} steps: one segment of "
                              f"{self.p.segment_steps} steps, nothing to exploit", where="pbt.segment_steps",
                              fix="use segments shorter than the stage")
        for m in (self.metric, self.p.kl_metric if self.p.kl_penalty else None):
            if m and m.startswith("eval/"):
                every = int(scfg.eval_every)
                if every <= 0 or self.p.segment_steps % every:
                    raise ConfigError(f"the ranking metric {m} is the held-out evaluation, which runs every "
                                      f"{section}.eval_every={every} steps, not at every segment end "
                                      f"(pbt.segment_steps={self.p.segment_steps})", where=f"{section}.eval_every",
                                      fix=f"set {section}.eval_every to a divisor of pbt.segment_steps, or rank by a "
                                          "rollout metric (pbt.metric=rollout/reward_mean)")
        self.log_every = math.gcd(self.p.segment_steps, int(st.cfg.trainer.log_every_n_steps) or 1)

    def identity(self) -> dict:
        return {"space": [p.describe() for p in self.params], "pbt": asdict(self.p), "overrides": self.tuner.base,
                "seed": self.seed, "pipeline": self.tuner.base_fingerprints, "stage": self.stage,
                "metric": self.metric}

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.dir / STATE

    def load(self) -> dict | None:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None

    def save(self, state: dict) -> None:
        _atomic_write(self.state_path, json.dumps(state, indent=2, default=float))

    def create(self) -> dict:
        rng = np.random.default_rng([self.p.seed, 0])
        members, seen = [], set()
        for i in range(self.p.population):
            for _ in range(100):
                given = self.tuner.spec.enqueue[i] if i < len(self.tuner.spec.enqueue) else {}
                values = {p.key: given[p.key] if p.key in given else _sample(p, rng) for p in self.params}
                if json.dumps(values, sort_keys=True) not in seen:
                    break
            seen.add(json.dumps(values, sort_keys=True))
            members.append({"id": i, "initial": values, "schedule": [], "lineage": [],
                            "segments": {"0": {"state": "pending", "values": values}}})
        return {"version": 1, "identity": json.loads(json.dumps(self.identity())), "method": self.p.method,
                "stage": self.stage, "kind": self.kind, "metric": self.metric, "seed": self.seed,
                "total_steps": self.total_steps, "segment_steps": self.p.segment_steps, "segments": self.segments,
                "segment": 0, "members": members, "events": [],
                "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}

    def open(self) -> dict:
        """The study's population: created on first use, else resumed (same identity)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.tuner.lock():
            state = self.load()
            if state is None:
                state = self.create()
                self.save(state)
            elif state["identity"] != json.loads(json.dumps(self.identity())):
                changed = [k for k, v in self.identity().items() if json.loads(json.dumps(v)) != state["identity"].get(k)]
                raise ConfigError(f"study {self.tuner.study_name!r} has a population with a different "
                                  f"{', '.join(changed)}", where="tune.study_name",
                                  fix="re-run with the same sweep and overrides to resume it, or start a new study "
                                      "with tune.study_name=<new name>")
        return state

    # ------------------------------------------------------------------ members
    def values_at(self, member: dict, step: int) -> dict:
        """The member's hyperparameters in effect at ``step``."""
        values = dict(member["initial"])
        for entry in member["schedule"]:
            if entry["step"] <= step:
                values.update(entry["values"])
        return values

    def overrides(self, member: dict) -> list[str]:
        """The member's configuration as pipeline overrides (base, initial values, schedule)."""
        out = self.tuner.base + [sp.override(k, v) for k, v in member["initial"].items()]
        if member["schedule"]:
            entries = ",".join("{step:%d,overrides:[%s]}" % (e["step"], ",".join(
                sp.hydra_value(sp.override(k, v)) for k, v in e["values"].items())) for e in member["schedule"])
            out.append(f"{self._schedule_key()}=[{entries}]")
        return out

    def _schedule_key(self) -> str:
        from pipeline.stages import STAGES

        return STAGES.get(self.kind).schedule_key

    def score(self, metrics: dict) -> float | None:
        """The ranking score (higher is better; None when not finite) from a stage's metrics at a step."""
        if self.metric not in metrics:
            raise MissingMetric(f"stage {self.stage!r} does not report {self.metric!r} at segment ends; it reports "
                                f"{', '.join(sorted(k for k in metrics if k != 'step'))}", where="pbt.metric")
        value = self.sign * float(metrics[self.metric])
        if self.p.kl_penalty:
            value -= self.p.kl_penalty * float(metrics.get(self.p.kl_metric, 0.0))
        return value if math.isfinite(value) else None

    def _ckpt_dir(self, member_id: int, segment: int) -> Path:
        return self.dir / CHECKPOINTS / f"{member_id:02d}" / f"seg-{segment:02d}"

    def _resume_dir(self, overrides: list[str], run_dir: Path) -> Path:
        from pipeline.artifacts import ArtifactStore
        from pipeline.run import plan

        cfg = self.tuner.run_cfg(overrides, self.seed, run_dir)
        fp = {s.name: s.fingerprint for s in plan(cfg)}[self.stage]
        return ArtifactStore(cfg.paths.artifact_dir).resume_path(self.kind, fp)

    def run_segment(self, member: dict, segment: int) -> dict:
        """Train ``member`` through ``segment`` (from its checkpoint at the previous boundary)."""
        k = self.p.segment_steps
        stop = min((segment + 1) * k, self.total_steps)
        final = stop >= self.total_steps
        overrides = self.overrides(member) + [f"trainer.checkpoint_every_n_steps={k}",
                                              f"trainer.log_every_n_steps={self.log_every}"]
        run_dir = self.dir / MEMBERS / f"{member['id']:02d}" / f"segment-{segment:02d}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a rerun after a crash
        resume_dir = self._resume_dir(overrides, run_dir)
        if segment > 0:
            src = self._ckpt_dir(member["id"], segment - 1)
            if not (src / "state.json").is_file():
                raise TrainingError(f"member {member['id']} has no checkpoint of segment {segment - 1} in {src}",
                                    where=str(self.state_path), fix="start a new study (tune.study_name=...)")
            _link_tree(src, resume_dir)
        else:
            shutil.rmtree(resume_dir, ignore_errors=True)  # always from the start
        hook = SegmentHook(self.stage, None if final else stop)
        t0 = time.time()
        out: dict = {"run_dir": str(run_dir), "steps": [segment * k, stop]}
        try:  # a segment trains even when a run of the same configuration is cached (it needs the checkpoint)
            run = self.tuner.run_config(overrides, self.seed, run_dir, hook=hook, rebuild=() if final else [self.stage],
                                        run_name=f"{self.tuner.study_name}/m{member['id']}/s{segment}")
        except SegmentEnd:
            metrics = hook.metrics
            got = json.loads((resume_dir / "state.json").read_text())["step"]
            if got != stop:
                raise TrainingError(f"the segment's checkpoint is at step {got}, not {stop}", where=str(resume_dir))
            dst = self._ckpt_dir(member["id"], segment)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(dst, ignore_errors=True)
            shutil.move(str(resume_dir), str(dst))
            if segment == 0:  # the score of the starting policy (PB2's first improvement)
                out["start_score"] = self._step0_score(dst)
        else:
            if not final:
                raise TrainingError(f"stage {self.stage} ended before step {stop}", where="pbt.segment_steps")
            shutil.rmtree(resume_dir, ignore_errors=True)  # unused when the final run was cached
            metrics = {"step": stop, **run.results["stages"][self.stage]["metrics"]}
            out["objectives"] = {o.metric: run.metric(o.metric, o.stage) for o in self.tuner.objectives}
            out["fingerprints"] = run.fingerprints
        out.update(metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                   score=self.score(metrics), seconds=round(time.time() - t0, 3))
        return out

    def _step0_score(self, ckpt_dir: Path) -> float | None:
        for curve in ckpt_dir.glob("files-*/curve.jsonl"):
            for line in curve.read_text().splitlines():
                row = json.loads(line)
                if row.get("step") == 0 and self.metric in row:
                    return self.score(row)
        return None

    def observations(self) -> tuple[np.ndarray, np.ndarray]:
        """PB2's data: (unit values + time, score improvement) of every completed segment."""
        numeric = [p for p in self.params if p.kind != "categorical"]
        xs, ys = [], []
        for m in self._state["members"]:
            for s, task in m["segments"].items():
                start, end = task.get("start_score"), task.get("score")
                if task.get("state") != "done" or start is None or end is None:
                    continue
                if not (math.isfinite(start) and math.isfinite(end)):
                    continue
                t = int(s) / max(self.segments - 1, 1)
                xs.append([_to_unit(p, task["values"][p.key]) for p in numeric] + [t])
                ys.append(end - start)
        return np.array(xs).reshape(len(xs), len(numeric) + 1), np.array(ys)

    # ------------------------------------------------------------------ boundaries
    def advance(self, state: dict) -> None:
        """All members finished the current segment: exploit and explore, open the next segment."""
        s = state["segment"]
        members = state["members"]
        if s + 1 >= state["segments"]:
            state["segment"] = s + 1
            return
        step = (s + 1) * self.p.segment_steps
        scores = {m["id"]: _ranking(m["segments"][str(s)]) for m in members}
        ranked = sorted(members, key=lambda m: (-scores[m["id"]], m["id"]))
        n = max(1, int(math.floor(len(members) * self.p.quantile)))
        top = [m for m in ranked[:n] if math.isfinite(scores[m["id"]])]
        if not top:
            raise TrainingError(f"every member failed in segment {s}", where=str(self.state_path),
                                fix="see the members' reasons in population.json and their run directories")
        # the bottom quantile, and every failed member (it has no checkpoint to continue from)
        bottom = [m for m in ranked if m in ranked[-n:] or not math.isfinite(scores[m["id"]])]
        rng = np.random.default_rng([self.p.seed, 1, s])
        partners = [top[int(rng.integers(len(top)))] for _ in bottom]
        self._state = state
        explore = EXPLORERS.get(self.p.method)
        losers = {m["id"] for m in bottom}
        configs = {json.dumps([m["initial"], m["schedule"]], sort_keys=True) for m in members if m["id"] not in losers}
        new_values = None
        for _ in range(20):  # two members never share a configuration (they would share a resume directory)
            new_values = explore(self, [self.values_at(j, step) for j in partners], s, rng)
            keys = [json.dumps([j["initial"], j["schedule"] + [{"step": step, "values": v}]], sort_keys=True)
                    for j, v in zip(partners, new_values)]
            if len(set(keys)) == len(keys) and not configs & set(keys):
                break
        finite = lambda x: x if math.isfinite(x) else None  # noqa: E731 (JSON has no infinities)
        starts = {m["id"]: finite(scores[m["id"]]) for m in members}
        for i, j, values in zip(bottom, partners, new_values):
            event = {"segment": s, "step": step, "member": i["id"], "copied": j["id"],
                     "score": finite(scores[i["id"]]), "copied_score": finite(scores[j["id"]]),
                     "old": self.values_at(i, step), "new": values}
            i["initial"] = copy.deepcopy(j["initial"])
            i["schedule"] = copy.deepcopy(j["schedule"]) + [{"step": step, "values": values}]
            i["lineage"].append(event)
            starts[i["id"]] = finite(scores[j["id"]])
            state["events"].append(event)
            _link_tree(self._ckpt_dir(j["id"], s), self._ckpt_dir(i["id"], s))
            log.info("step %d: member %d (score %.4g) copies member %d (score %.4g) and explores %s", step, i["id"],
                     scores[i["id"]], j["id"], scores[j["id"]],
                     " ".join(sp.override(k, v) for k, v in values.items()))
        for m in members:
            m["segments"][str(s + 1)] = {"state": "pending", "values": self.values_at(m, step),
                                         "start_score": starts[m["id"]]}
            if s > 0:
                shutil.rmtree(self._ckpt_dir(m["id"], s - 1), ignore_errors=True)
        state["segment"] = s + 1

    # ------------------------------------------------------------------ workers
    def _stale(self, task: dict) -> bool:
        w = task.get("worker") or {}
        if w.get("host") == WORKER_ID["host"] and w.get("pid") and not _pid_alive(int(w["pid"]), w.get("id")):
            return True
        return time.time() - float(task.get("heartbeat") or 0) > self.t.grace_period

    def _claim(self, worker_index: int) -> tuple[dict | None, bool]:
        """Under the lock: (a segment task to run or None, whether the study is finished)."""
        with self.tuner.lock():
            state = self.load()
            while state["segment"] < state["segments"]:
                s = str(state["segment"])
                tasks = [(m, m["segments"][s]) for m in state["members"]]
                if all(t["state"] in ("done", "failed") for _, t in tasks):
                    self.advance(state)
                    self.save(state)
                    continue
                for m, task in tasks:
                    if task["state"] == "pending" or (task["state"] == "running" and self._stale(task)):
                        if task["state"] == "running":
                            log.warning("member %d, segment %s: its worker is gone; running it again", m["id"], s)
                        task.update(state="running", worker={**WORKER_ID, "index": worker_index},
                                    heartbeat=time.time())
                        self.save(state)
                        return {"member": m, "segment": int(s)}, False
                return None, False
            return None, True

    def _record(self, member_id: int, segment: int, result: dict | None, reason: str | None = None,
                release: bool = False) -> None:
        with self.tuner.lock():
            state = self.load()
            task = state["members"][member_id]["segments"][str(segment)]
            if task.get("worker", {}).get("id") != WORKER_ID["id"]:
                return  # declared stale meanwhile and claimed by another worker
            if release:
                task.update(state="pending", worker=None)
            elif result is None:
                task.update(state="failed", reason=reason, score=None)
            else:
                task.update(state="done", **result)
            self.save(state)

    @contextlib.contextmanager
    def _heartbeat(self, member_id: int, segment: int):
        stop = threading.Event()

        def beat():
            while not stop.wait(self.t.heartbeat_interval):
                with contextlib.suppress(Exception), self.tuner.lock():
                    state = self.load()
                    task = state["members"][member_id]["segments"][str(segment)]
                    if task.get("worker", {}).get("id") == WORKER_ID["id"]:
                        task["heartbeat"] = time.time()
                        self.save(state)
        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def work(self, worker_index: int = 0, deadline: float | None = None, on_segment=None, poll_s: float = 1.0) -> bool:
        """Run members' segments until the study is finished (True) or the deadline passes (False)."""
        while True:
            if deadline is not None and time.time() > deadline:
                return False
            claimed, finished = self._claim(worker_index)
            if finished:
                return True
            if claimed is None:  # the others' segments of this boundary are still running
                time.sleep(poll_s)
                continue
            m, s = claimed["member"], claimed["segment"]
            log.info("member %d, segment %d: %s", m["id"], s, " ".join(sp.override(k, v) for k, v in
                                                                        self.values_at(m, s * self.p.segment_steps).items()))
            try:
                with self._heartbeat(m["id"], s):
                    result = self.run_segment(m, s)
            except (KeyboardInterrupt, SystemExit):
                self._record(m["id"], s, None, release=True)
                raise
            except MissingMetric:
                self._record(m["id"], s, None, release=True)
                raise
            except Exception as err:  # noqa: BLE001 - a failed member is the worst member (it gets replaced)
                reason = err.render().splitlines()[0] if isinstance(err, PipelineError) else f"{type(err).__name__}: {err}"
                log.warning("member %d, segment %d failed: %s", m["id"], s, reason)
                self._record(m["id"], s, None, reason=reason[:500])
            else:
                self._record(m["id"], s, result)
            if on_segment is not None:
                on_segment(m["id"], s)

    # ------------------------------------------------------------------ outputs
    def best(self, state: dict) -> dict | None:
        o = self.tuner.objectives[0]
        sign = 1.0 if o.direction == "maximize" else -1.0
        last = str(state["segments"] - 1)
        done = [m for m in state["members"] if m["segments"].get(last, {}).get("state") == "done"]
        if not done:
            return None
        return max(done, key=lambda m: (sign * m["segments"][last]["objectives"][o.metric], -m["id"]))

    def write_outputs(self, state: dict, console=None) -> dict:
        from pipeline.tune import outputs as out

        best = self.best(state)
        doc = {"study": self.tuner.study_name, "sweep": self.tuner.spec.name, "method": self.p.method,
               "settings": asdict(self.p), "stage": self.stage, "metric": self.metric, "seed": self.seed,
               "overrides": self.tuner.base, "search_space": [p.describe() for p in self.params],
               "budget": {"population": self.p.population, "total_steps": self.total_steps,
                          "segments": self.segments, "rollout_steps": self.p.population * self.total_steps},
               "events": state["events"], "members": state["members"],
               "exploits": len(state["events"])}
        last = str(state["segments"] - 1)
        if best is not None:
            seg = best["segments"][last]
            name = f"{self.tuner.study_name}_schedule"
            text, problem = self._preset(best, seg, name)
            doc["best"] = {"member": best["id"], "objectives": seg["objectives"], "score": seg["score"],
                           "initial": best["initial"], "schedule": best["schedule"], "lineage": best["lineage"],
                           "overrides": self.overrides(best), "preset": str(self.dir / "experiment" / f"{name}.yaml"),
                           "reproduces_member": problem is None}
            if problem:
                log.warning("%s.yaml does not reproduce member %d (%s)", name, best["id"], problem)
            if self.t.test_seeds and self.t.phase in ("all", "report"):
                doc["test"] = self._test(best, console)
        _atomic_write(self.dir / SUMMARY, json.dumps({k: v for k, v in doc.items() if k != "members"}, indent=2,
                                                      default=float))
        _atomic_write(self.dir / TABLE, self._table(state))
        state["best"] = doc.get("best")
        with self.tuner.lock():
            self.save(state)
        if console is not None:
            self._print(doc, state, console)
        return doc

    def _preset(self, best: dict, seg: dict, name: str) -> tuple[str, str | None]:
        from pipeline.tune import outputs as out

        defaults, values = out.preset_dict(self.tuner, self.overrides(best), self.seed)
        o = self.tuner.objectives[0]
        lines = ["# @package _global_",
                 f"# Best member of population-based training study {self.tuner.study_name!r} ({self.p.method}): "
                 f"member {best['id']}, {o.metric} = {out._fmt(seg['objectives'][o.metric])} (seed {self.seed})"]
        for e in best["lineage"]:
            lines.append(f"#   step {e['step']}: copied member {e['copied']} (score {out._fmt(e['copied_score'])} vs "
                         f"{out._fmt(e['score'])}) and explored "
                         + " ".join(sp.override(k, v) for k, v in e["new"].items()))
        lines += ["# its schedule, replayed as one run (same seed: same curve and score):",
                  f"#   python -m pipeline --config-dir {self.dir} experiment={name}"]
        if defaults:
            lines += ["defaults:"] + [f"  - {d}" for d in defaults] + ["  - _self_"]
        from omegaconf import OmegaConf

        text = "\n".join(lines) + "\n" + (OmegaConf.to_yaml(OmegaConf.create(values)) if values else "")
        _atomic_write(self.dir / "experiment" / f"{name}.yaml", text)
        _atomic_write(self.dir / f"{name}.yaml", text)
        problem = out.preset_problem(self.tuner, name, seg.get("fingerprints") or {})
        return text, problem

    def _test(self, best: dict, console) -> dict:
        from pipeline.tune.outputs import _stats

        o = self.tuner.objectives[0]
        per_seed, errors = {}, {}
        if console is not None:
            console.print(f"replaying the best schedule on test seeds {list(self.t.test_seeds)} ...", markup=False)
        for seed in self.t.test_seeds:
            try:
                run = self.tuner.run_config(self.overrides(best), seed, self.dir / "test" / f"seed-{seed}",
                                            run_name=f"{self.tuner.study_name}/test/s{seed}")
                per_seed[str(seed)] = run.metric(o.metric, o.stage)
            except Exception as err:  # noqa: BLE001
                errors[str(seed)] = f"{type(err).__name__}: {err}"
        return {"metric": o.metric, **_stats(list(per_seed.values())), "per_seed": per_seed, "errors": errors}

    def _table(self, state: dict) -> str:
        buf = io.StringIO()
        keys = [p.key for p in self.params]
        w = csv.writer(buf)
        w.writerow(["member", "segment", "start_step", "end_step", "state", "score", "start_score", *keys,
                    "copied_from", "run_dir"])
        copied = {(e["member"], e["segment"] + 1): e["copied"] for e in state["events"]}
        for m in state["members"]:
            for s, task in sorted(m["segments"].items(), key=lambda kv: int(kv[0])):
                steps = task.get("steps") or [int(s) * self.p.segment_steps, None]
                w.writerow([m["id"], s, steps[0], steps[1], task.get("state"), task.get("score"),
                            task.get("start_score"), *[task.get("values", {}).get(k) for k in keys],
                            copied.get((m["id"], int(s)), ""), task.get("run_dir", "")])
        return buf.getvalue()

    def _print(self, doc: dict, state: dict, console) -> None:
        from rich.table import Table

        o = self.tuner.objectives[0]
        last = str(state["segments"] - 1)
        table = Table(title=f"population of {self.tuner.study_name} ({self.p.method}, {len(state['events'])} exploits)")
        for col in ("member", o.metric, "score", "copied (step <- member)"):
            table.add_column(col)
        for m in state["members"]:
            seg = m["segments"].get(last, {})
            table.add_row(str(m["id"]), f"{seg.get('objectives', {}).get(o.metric, float('nan')):.4g}",
                          f"{seg.get('score', float('nan')):.4g}",
                          ", ".join(f"{e['step']}<-{e['copied']}" for e in m["lineage"]))
        console.print(table)
        if doc.get("best"):
            b = doc["best"]
            console.print(f"best: member {b['member']}; replay its schedule: python -m pipeline --config-dir "
                          f"{self.dir} experiment={self.tuner.study_name}_schedule", markup=False)


def run_population(tuner: Tuner, console=None):
    """``python -m pipeline.tune`` for a sweep with a ``pbt:`` section."""
    from pipeline.tune import StudyResult
    from pipeline.tune.worker import launch, set_threads, wait

    pop = Population(tuner)
    t = tuner.t
    state = pop.open()
    finisher = t.phase == "report" or (t.phase == "all" and t.worker == 0)
    finished = state["segment"] >= state["segments"]
    if t.phase in ("all", "trials") and not finished:
        set_threads(t.n_workers)
        deadline = time.time() + t.timeout if t.timeout else None
        procs = launch(tuner, range(1, t.n_workers)) if t.n_workers > 1 and t.phase == "all" else []
        if console is not None:
            console.print(f"population of {pop.p.population} ({pop.p.method}), {pop.segments} segments of "
                          f"{pop.p.segment_steps} steps of stage {pop.stage}; resuming at segment {state['segment']}"
                          if state["segment"] or any(m["segments"]["0"]["state"] != "pending" for m in state["members"])
                          else f"population of {pop.p.population} ({pop.p.method}), {pop.segments} segments of "
                               f"{pop.p.segment_steps} steps of stage {pop.stage}", markup=False)
        interrupted = False
        try:
            say = (lambda i, s: console.print(f"  member {i} finished segment {s}", markup=False)) \
                if console is not None and t.progress else None
            finished = pop.work(t.worker, deadline=deadline, on_segment=say)
        except BaseException:
            interrupted = True
            raise
        finally:
            wait(procs, terminate=interrupted)
    if not finisher or not finished:
        return StudyResult(tuner.study_dir, None, None)
    doc = pop.write_outputs(pop.load(), console)
    return StudyResult(tuner.study_dir, doc, doc.get("test"))
