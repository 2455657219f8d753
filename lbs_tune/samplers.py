"""The samplers of the studies: which parameters trial n of a grid point's study gets.

A fresh sampler per trial (`make_sampler`), so that a trial's draw never depends on what this
process asked before: a searcher rebuilt after a kill draws what the killed one would have.
Imported by the searcher (and its tests); nothing here starts Ray.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna
from scipy.stats import qmc

from lbs_tune.space import SearchSpec


def _seed(*parts: int) -> int:
    """A 32-bit seed that is a fixed function of `parts` (sweep seed, point, trial number)."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def make_sampler(search: SearchSpec, point: int, number: int):
    """The sampler that asks trial `number` of grid point `point`'s study.

    A fresh sampler per trial, so that a trial's draw never depends on what this process asked
    before: a searcher rebuilt after a kill draws what the killed one would have. qmc: point
    `number` of a scrambled Sobol sequence over the whole space, seeded from (search.seed,
    point) (`sobol_point`); tpe and random: seeded from (search.seed, point, number).
    """
    if search.sampler == "qmc":
        return SobolSampler(search, point)
    seed = _seed(search.seed, point, number)
    if search.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def sobol_point(search: SearchSpec, point: int, number: int) -> dict[str, Any]:
    """{key: value} of trial `number` of grid point `point`: the `number`-th point of the
    scrambled Sobol sequence (scipy's, seeded from search.seed and the point) over the unit cube
    of the space's keys in sorted order, each coordinate mapped through its distribution's
    quantile (log-uniform in log space, integers and values in equal shares)."""
    keys = sorted(search.space)
    engine = qmc.Sobol(len(keys), scramble=True, seed=_seed(search.seed, point))
    if number:
        engine.fast_forward(number)
    unit = engine.random(1)[0]
    return {key: search.space[key].at(float(u)) for key, u in zip(keys, unit, strict=True)}


class SobolSampler(optuna.samplers.BaseSampler):
    """Draws trial n's parameters from point n of the Sobol sequence (`sobol_point`). Optuna's
    own QMCSampler takes the next point from a counter in the study's storage, so a trial asked
    again after a kill (or one whose ask was cut short) would take a later point and an
    interrupted sweep would not draw what an uninterrupted one draws."""

    def __init__(self, search: SearchSpec, point: int):
        self._search, self._point = search, point

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return sobol_point(self._search, self._point, trial.number)[param_name]


class FixedSampler(optuna.samplers.BaseSampler):
    """Gives every parameter a set value: a confirmation run takes its search trial's values
    (the confirmation study records them as its trial's parameters)."""

    def __init__(self, params: dict[str, Any]):
        self._params = params

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._params[param_name]
