"""The Ray Tune searcher of a branched sweep (a `branch:` section): the reference, then the
branches from its checkpoints, then the comparison of a planned batch schedule with constant
batches, all trials of one Ray Tune experiment. Imported by the runner alone (it subclasses
Ray's `Searcher`); what each trial is, and how losses become a schedule, is `lbs_tune.probes`.

Each suggestion is a whole trial config (the Tuner's param space is empty). A trial is asked
only when its phase can start: a branch once the reference has a checkpoint at or past its
point (or has ended), the comparison once every branch has ended (the plan needs them all);
until then `suggest` answers None and Ray asks again.

State: the file `branch_state.txt` of the experiment folder (JSON), written at every change: each
trial's Ray id, whether it ended (errored or not), a branch's reported values of the metric,
the reference's budget in steps, where each point fell, and the plan. Ray's checkpoint of the
searcher is a pointer. Resume, as `lbs_tune.searcher`'s: rebuilt from the file after a restart,
a trial that Ray's newest experiment state holds is waited for (Ray runs an unfinished one
again under its id and config, an errored one too); one that it does not hold (asked after Ray
last saved its state) is offered again with the same config, its values kept if it had ended,
so every slot ends as one trial that Ray knows, and a killed driver resumes to exactly the
trials, points, branch losses and plan of an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray.tune.search import Searcher

from lbs_tune.checkpoints import read_state
from lbs_tune.config import trial_config
from lbs_tune.errors import UserError
from lbs_tune.experiment import BRANCH_STATE_FILE, is_trial_folder, trial_checkpoints
from lbs_tune.probes import (
    Point,
    Slot,
    arm_config,
    branch_config,
    branch_loss,
    budget_examples,
    largest_batch,
    place,
    plan,
    point_sizes,
    reference_config,
    slots,
    smoothing,
    tolerance,
    wanted_examples,
)
from lbs_tune.searcher import _ray_trial_ids
from lbs_tune.storage import locate
from lbs_tune.sweep import BranchSpec

STATE_FORMAT = 1


class BranchSearcher(Searcher):
    """BranchSearcher(spec, reference, folder, train_size): `spec` the sweep's branch section,
    `reference` the resolved base trial config (JSON data), `folder` the local experiment
    folder, `train_size` the examples of the reference's training split."""

    def __init__(
        self, spec: BranchSpec, reference: dict[str, Any], folder: str | Path, train_size: int
    ):
        super().__init__(metric=None, mode=None)  # Ray's Searcher: Tune checks no metric of ours
        self.spec = spec
        self.reference = reference
        self.folder = str(Path(folder).expanduser().resolve())
        self.train_size = train_size
        self.restored = False
        self._state: dict[str, Any] | None = None
        self._live: dict[str, int] = {}  # Ray trial id -> slot index, for trials running now
        self._orphans: list[int] = []  # slots to offer again
        self._steps: dict[str, int] = {}  # the reference's checkpoint file -> its step

    # Ray pickles the searcher into tuner.pkl: keep the settings, the state is in the file.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_state": None, "_live": {}, "_orphans": [], "_steps": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def _file(self) -> Path:
        return Path(self.folder, BRANCH_STATE_FILE)

    def _open(self) -> dict[str, Any]:
        if self._state is not None:
            return self._state
        plan_slots = slots(self.spec)
        if self._file.exists():
            state = json.loads(self._file.read_text())
        elif self.restored:
            raise UserError(
                f"{self._file}: the branch state of this sweep is missing (was the experiment "
                "folder moved or the file deleted?); run the sweep with --fresh"
            )
        else:
            state = {
                "format": STATE_FORMAT,
                "slots": [{"trial": None, "ended": False, "errored": False} for _ in plan_slots],
                "values": {},
                "total_steps": None,
                "points": [None] * len(self.spec.points),
                "plan": None,
            }
        if len(state["slots"]) != len(plan_slots):
            raise UserError(f"{self._file}: made by another branch section; run with --fresh")
        known = _ray_trial_ids(self.folder)
        for index, slot in enumerate(state["slots"]):
            trial = slot["trial"]
            if trial is None or (trial in known and slot["ended"] and not slot["errored"]):
                continue
            if slot["errored"] or not slot["ended"]:  # it runs again: its values anew
                slot.update(ended=False, errored=False)
                state["values"].pop(str(index), None)
            if trial in known:  # Ray runs it again under its id and config
                self._live[trial] = index
            else:  # asked after Ray last saved its state: offer it again, same config
                self._orphans.append(index)
        self._state = state
        self._save()
        return state

    def _save(self) -> None:
        locate(self._file).write_text(json.dumps(self._state, indent=1) + "\n")

    # ------------------------------------------------------------------------ Ray's calls

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        """The Tuner's param space is empty: each suggestion is a whole trial config."""
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """The next trial whose phase can start; None while it cannot yet; FINISHED once every
        trial is asked (or the reference failed, so no branch can be)."""
        state = self._open()
        if self._orphans:
            index = self._orphans.pop(0)
        else:
            index = next((i for i, s in enumerate(state["slots"]) if s["trial"] is None), None)
            if index is None:
                return self.FINISHED
        config = self._config(slots(self.spec)[index])
        if config is None:  # an orphan's phase has started: only a new slot waits
            return self.FINISHED if self._stuck() else None
        state["slots"][index]["trial"] = trial_id
        self._live[trial_id] = index
        self._save()
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        state = self._open()  # first: a restored run learns here which trials are live
        index = self._live.get(trial_id)
        if index is None:
            return
        if index == 0:
            if state["total_steps"] is None and result.get("total_steps"):
                state["total_steps"] = int(result["total_steps"])
                self._save()
            self._place(final=False)
        else:
            self._record(index, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        """The slot ends (an errored one too: its phase goes on without it, a branch of it
        counting as diverged); a trial told before (run again after a restart) changes
        nothing."""
        state = self._open()
        index = self._live.pop(trial_id, None)
        if index is None:
            return
        slot = state["slots"][index]
        if slot["ended"]:
            return
        if result and not error:
            self._record(index, result)
        slot.update(ended=True, errored=error)
        if index == 0 and not error:
            self._place(final=True)
        self._maybe_plan()
        self._save()

    def _record(self, index: int, result: dict[str, Any]) -> None:
        """Keep a branch's reported value of the metric, once per step (a trial run again from a
        checkpoint sends its earlier reports again); an ended slot keeps the values it has."""
        if slots(self.spec)[index].phase != "branch" or self._state["slots"][index]["ended"]:
            return
        values = self._state["values"].setdefault(str(index), {})
        step = result.get("step")
        if step is not None and str(step) not in values:
            values[str(step)] = result.get(self.spec.metric)

    def save(self, checkpoint_path: str) -> None:
        """Ray's searcher checkpoint: only a pointer, the state is the experiment's file."""
        Path(checkpoint_path).write_text(json.dumps({"state": str(self._file)}))

    def restore(self, checkpoint_path: str) -> None:
        """Called by Tuner.restore: the state is read again from its file on first use."""
        self.restored = True
        self._state = None
        self._live, self._orphans, self._steps = {}, [], {}

    # ------------------------------------------------------------------------ Phases

    def _config(self, slot: Slot) -> dict[str, Any] | None:
        """The trial config of `slot`, None while its phase cannot start."""
        state = self._state
        reference = trial_config(self.reference)
        if slot.phase == "reference":
            return reference_config(reference)
        if slot.phase == "branch":
            point = state["points"][slot.point]
            if point is None:
                return None
            return branch_config(reference, self.spec, slot, Point(*point), self.train_size)
        if state["plan"] is None:
            return None
        schedule = tuple(tuple(entry) for entry in state["plan"]["schedule"])
        return arm_config(reference, self.spec, slot, schedule, self.train_size)

    def _stuck(self) -> bool:
        """Whether the next phase can never start: the reference ended with a point unplaced
        (it failed, or ended before its first checkpoint). The sweep then ends short."""
        state = self._state
        return state["slots"][0]["ended"] and None in state["points"]

    def _place(self, final: bool) -> None:
        """Place the points that the reference's checkpoints now decide (see probes.place)."""
        state = self._state
        if None not in state["points"] or state["total_steps"] is None:
            return
        # The trial's folder by its name (runner.trial_dirname): it may hold checkpoints before
        # the driver has written its params.json there.
        reference = state["slots"][0]["trial"]
        experiment = locate(self.folder)
        folders = [
            experiment.join(info.base_name)
            for info in experiment.listdir()
            if info.type == pafs.FileType.Directory and is_trial_folder(info.base_name, reference)
        ]
        batch = self.reference["batch_size"]
        found = []
        for folder in folders:
            for checkpoint in trial_checkpoints(folder):
                if checkpoint.uri not in self._steps:
                    try:
                        self._steps[checkpoint.uri] = int(read_state(checkpoint)["step"])
                    except (UserError, OSError):  # still being written: next time
                        continue
                step = self._steps[checkpoint.uri]
                found.append((step, step * batch, checkpoint.uri))
        found.sort()
        budget = budget_examples(trial_config(self.reference), self.train_size)
        changed = False
        for i, point in enumerate(state["points"]):
            if point is None:
                wanted = wanted_examples(self.spec, i, budget)
                placed = place(found, wanted, final)
                if placed is not None:
                    state["points"][i] = list(placed)
                    changed = True
        if changed:
            self._save()

    def _maybe_plan(self) -> None:
        """Once every branch has ended: the local critical batch sizes and the schedule."""
        state = self._state
        all_slots = slots(self.spec)
        branches = [s for s in all_slots if s.phase == "branch"]
        if state["plan"] is not None or not all(state["slots"][s.index]["ended"] for s in branches):
            return
        alpha = smoothing(self.spec)
        losses: dict[int, dict[int, list[float]]] = {}
        for s in branches:
            reported = state["values"].get(str(s.index), {})
            values = [reported[step] for step in sorted(reported, key=int)]
            loss = branch_loss(values, alpha, state["slots"][s.index]["errored"])
            losses.setdefault(s.point, {}).setdefault(s.k, []).append(loss)
        batch = self.reference["batch_size"]
        sizes = point_sizes(losses, batch, tolerance(self.spec))
        points = [Point(*p) for p in state["points"]]
        schedule = plan(points, sizes, batch, largest_batch(self.spec, batch))
        state["plan"] = {
            "schedule": [list(entry) for entry in schedule],
            "local_cbs": {str(i): size._asdict() for i, size in sizes.items()},
        }
