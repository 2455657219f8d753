"""`lbs-tune train`: one trial in this process, without Ray, in a folder it can resume from.

The folder holds `config.json` (the resolved trial config), `metrics.jsonl` (one JSON object per
report) and `checkpoints/step_XXXXXXXX.pt`. Running again in the same folder resumes from the
newest readable checkpoint, also after `kill -9`: `metrics.jsonl` is rewritten from the reports
that checkpoint holds, and the reports made after it are made again, so the history stays
continuous.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from lbs_tune.checkpoints import load_checkpoint, save_checkpoint
from lbs_tune.errors import UserError
from lbs_tune.progress import Progress
from lbs_tune.spec import TrialConfig, flatten
from lbs_tune.training import train

CHECKPOINT_NAME = re.compile(r"^step_(\d+)\.pt$")
# Keys that may differ between a run and its resumption.
RESUMABLE_KEYS = {"device", "data.dir", "data.download"}


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a crash leaves the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".tmp-", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def checkpoint_files(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in `folder`, newest first."""
    found = []
    for path in folder.glob("step_*.pt"):
        match = CHECKPOINT_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def newest_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint. Corrupted ones newer than it are reported and moved aside
    (`<name>.damaged`), never deleted: the resumed run writes a new checkpoint of that step."""
    files = checkpoint_files(folder)
    for i, (_, path) in enumerate(files):
        try:
            state = load_checkpoint(path)
        except UserError as exc:
            if i + 1 == len(files):
                raise UserError(
                    f"{exc}; no earlier checkpoint to fall back to: move {path} aside to "
                    "start this run from the beginning"
                ) from None
            continue
        for _, damaged in files[:i]:
            aside = damaged.with_name(damaged.name + ".damaged")
            damaged.replace(aside)
            print(
                f"lbs-tune: warning: {damaged}: corrupted or truncated checkpoint, moved aside to "
                f"{aside.name}; resuming from {path.name}",
                file=sys.stderr,
            )
        return state
    return None


class LocalReporter:
    """Appends reports to metrics.jsonl, writes checkpoints, shows progress.

    Each checkpoint also holds every report made up to it (`reports`), so a resumed run rewrites
    metrics.jsonl from its checkpoint, whatever happened to the file after it.
    """

    def __init__(self, out: Path, keep: int | None, progress: Progress, sent: list[dict]):
        self.metrics_path = out / "metrics.jsonl"
        self.checkpoints = out / "checkpoints"
        self.keep = keep
        self.progress = progress
        self.sent = sent

    def step(self, step: int, total: int) -> None:
        self.progress.step(step, total)

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        # The report goes first: a crash before the checkpoint only makes the resume redo it.
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.sent.append(metrics)
        if checkpoint is not None:
            path = self.checkpoints / f"step_{checkpoint['step']:08d}.pt"
            save_checkpoint({**checkpoint, "reports": self.sent}, path)
            if self.keep:
                for _, old in checkpoint_files(self.checkpoints)[self.keep :]:
                    old.unlink()
        self.progress.report(metrics)


def _check_same_config(out: Path, config: TrialConfig) -> None:
    path = out / "config.json"
    # Without a checkpoint nothing was kept of a run (it failed before its first one, e.g. on
    # missing data): the new config replaces the old.
    if not path.exists() or not checkpoint_files(out / "checkpoints"):
        write_text_atomic(path, json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
        return
    try:
        old = flatten(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg}); use another --out") from None
    new = flatten(config.model_dump(mode="json"))
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k not in RESUMABLE_KEYS and old.get(k) != new.get(k)
    ]
    if changed:
        raise UserError(
            f"{out} holds a run of another config ({'; '.join(changed[:3])}); "
            "use another --out, or delete that folder to start over"
        )


def run_local(config: TrialConfig, out: Path) -> dict[str, Any]:
    """Run (or resume, or confirm finished) the trial in folder `out`; return its last metrics."""
    out = out.expanduser().resolve()
    _check_same_config(out, config)
    resume = newest_checkpoint(out / "checkpoints")
    metrics_path = out / "metrics.jsonl"
    kept = list(resume["reports"]) if resume else []
    if resume and resume["finished"]:
        print(
            f"{out}: this run already finished at step {resume['step']}; metrics in {metrics_path}"
        )
        return kept[-1] if kept else {}
    write_text_atomic(metrics_path, "".join(json.dumps(row) + "\n" for row in kept))
    if resume:
        print(f"{out}: resuming from the checkpoint of step {resume['step']}")
    progress = Progress()
    try:
        reporter = LocalReporter(out, config.keep_checkpoints, progress, kept)
        return train(config, reporter, resume)
    finally:
        progress.close()
