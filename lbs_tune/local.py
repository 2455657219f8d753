"""`lbs-tune train`: one trial in this process, without Ray, in a folder it can resume from.

The folder holds `config.json` (the resolved trial config), `metrics.jsonl` (one JSON object per
report) and `checkpoint_<step>/state.pt`, the layout of a Ray trial's checkpoints (listed and
resumed from by the same functions). Running again in the same folder resumes from the
newest readable checkpoint, also after `kill -9`: `metrics.jsonl` is rewritten from the reports
that checkpoint holds, and the reports made after it are made again, so the history stays
continuous.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lbs_tune.checkpoints import resume_state, save_checkpoint
from lbs_tune.config import TrialConfig, changes
from lbs_tune.errors import UserError, out_of_memory
from lbs_tune.experiment import (
    CHECKPOINT_FILE,
    RUN_CONFIG_FILE,
    RUN_METRICS_FILE,
    checkpoint_folder,
    trial_checkpoints,
)
from lbs_tune.progress import Progress
from lbs_tune.storage import locate
from lbs_tune.training import train

# A full disk, a quota, a read-only or forbidden folder: the user's to fix, not a bug.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# Keys that may differ between a run and its resumption.
RESUMABLE_KEYS = {"device", "data.dir", "data.download", "compile"}


def newest_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint of run folder `folder`. Corrupted ones newer than it are
    reported and their folders moved aside (`<folder>.damaged`), never deleted: the resumed run
    writes a new checkpoint of that step."""
    files = trial_checkpoints(locate(folder))[::-1]
    oldest = files[-1].parent().uri if files else ""
    fix = f"fall back to: move {oldest} aside to start this run from the beginning"
    return resume_state(files, fix, set_aside=True)


class LocalReporter:
    """Appends reports to metrics.jsonl, writes checkpoints, shows progress.

    Each checkpoint also holds every report made up to it (`reports`), so a resumed run rewrites
    metrics.jsonl from its checkpoint, whatever happened to the file after it.
    """

    def __init__(self, out: Path, keep: int | None, progress: Progress, sent: list[dict]):
        self.out = out
        self.keep = keep
        self.progress = progress
        self.sent = sent

    def step(self, step: int, total: int) -> None:
        self.progress.step(step, total)

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        # The report goes first: a crash before the checkpoint only makes the resume redo it.
        with (self.out / RUN_METRICS_FILE).open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.sent.append(metrics)
        if checkpoint is not None:
            path = self.out / checkpoint_folder(checkpoint["step"]) / CHECKPOINT_FILE
            save_checkpoint({**checkpoint, "reports": self.sent}, path)
            if self.keep:
                for old in trial_checkpoints(locate(self.out))[: -self.keep]:
                    shutil.rmtree(old.parent().path)
        self.progress.report(metrics)


def _check_same_config(out: Path, config: TrialConfig) -> None:
    path = out / RUN_CONFIG_FILE
    # Without a checkpoint nothing was kept of a run (it failed before its first one, e.g. on
    # missing data): the new config replaces the old.
    if not path.exists() or not trial_checkpoints(locate(out)):
        locate(path).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg}); use another --out") from None
    diff = changes(old, config.model_dump(mode="json"), ignore=RESUMABLE_KEYS, limit=3)
    if diff:
        raise UserError(
            f"{out} holds a run of another config ({diff}); "
            "use another --out, or delete that folder to start over"
        )


def run_local(config: TrialConfig, out: Path) -> dict[str, Any]:
    """Run (or resume, or confirm finished) the trial in folder `out`; return its last metrics."""
    out = out.expanduser().resolve()
    with _writes(out):
        _check_same_config(out, config)
        resume = newest_checkpoint(out)
        metrics_path = out / RUN_METRICS_FILE
        kept = list(resume["reports"]) if resume else []
        if resume and resume["finished"]:
            print(
                f"{out}: this run already finished at step {resume['step']}; "
                f"metrics in {metrics_path}"
            )
            return kept[-1] if kept else {}
        locate(metrics_path).write_text("".join(json.dumps(row) + "\n" for row in kept))
        if resume:
            print(f"{out}: resuming from the checkpoint of step {resume['step']}")
        progress = Progress()
        try:
            reporter = LocalReporter(out, config.keep_checkpoints, progress, kept)
            return train(config, reporter, resume)
        except torch.OutOfMemoryError:
            raise UserError(
                f"{out}: {out_of_memory(config.batch_size, config.micro_batch_size)}"
            ) from None
        finally:
            progress.close()


@contextlib.contextmanager
def _writes(out: Path) -> Iterator[None]:
    """A run folder that cannot be written (a full disk, a quota, no permission) is one line:
    the file being written was removed, the last whole checkpoint stays to resume from."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in WRITE_ERRORS:
            raise
        raise UserError(
            f"{out}: cannot write the run's files ({exc.strerror}); free space (or use another "
            "--out) and run again to resume"
        ) from None
