"""Checkpoint files: atomic writes, safe loads (weights_only), and every random state."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from lbs_tune.errors import UserError
from lbs_tune.experiment import newest_readable
from lbs_tune.storage import Location, locate, scaffolding

# What every checkpoint of the loop holds (training.train's state) with the reports made so far.
STATE_KEYS = ("step", "finished", "model", "optimizer", "sampler", "rng", "reports")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` atomically: a crash leaves the old file or the new one.

    Serialised in memory first: torch's zip writer reports a failed write (a full disk) as a
    RuntimeError, a plain write reports it as the OSError it is."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    target = locate(path)
    # A checkpoint folder left empty by a failed write would read as a damaged checkpoint.
    with scaffolding(target.parent()), target.atomic_output() as f:
        f.write(buffer.getbuffer())


def load_checkpoint(path: Path | str, stream: BinaryIO | None = None) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; a corrupted or truncated file is a UserError.

    `stream`, if given, is the open file (e.g. from a storage URI); `path` then only names it.
    """
    try:
        state = torch.load(stream or path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # torch raises many types for a damaged zip or pickle stream
        # Only the first sentence: torch goes on to suggest weights_only=False, which would run
        # whatever code a damaged or foreign file holds.
        reason = str(exc).split("\n")[0].split(". ")[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: corrupted or truncated checkpoint ({reason})") from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else ["all"]
    if missing:
        raise UserError(f"{path}: not an lbs-tune checkpoint (no {', '.join(missing)})")
    return state


def read_state(state: Location) -> dict[str, Any]:
    """The checkpoint at `state` (a local file or one on a storage URI), as `load_checkpoint`."""
    with state.fs.open_input_stream(state.path) as f:
        return load_checkpoint(state.uri, io.BytesIO(f.readall()))


def resume_state(
    candidates: list[Location], fix: str, set_aside: bool = False
) -> dict[str, Any] | None:
    """The state to resume from: the newest readable of `candidates` (checkpoint files, newest
    first), damaged newer ones reported (and with `set_aside` moved aside), None without any;
    a UserError whose fix is `fix` if all are damaged. The one resume path of a Ray trial and
    of `lbs-tune train`."""
    return newest_readable(candidates, read_state, fix, set_aside)


def rng_states() -> dict[str, Any]:
    """The global random states (torch CPU and CUDA, numpy, Python) as weights_only-safe values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
