"""How the training step runs on the device: eagerly, through `torch.compile`, or captured whole
in one CUDA graph (the trial config's `compile`), and how large a micro-batch fits the GPU
(`max_device_batch: auto`).

A captured step replays the eager step's own code: the batch (its indices drawn on the device by
the task's sampler, then gathered and augmented) is copied into static input buffers, the
learning rate into a device tensor, and one graph replays forward, backward, the update and the
accumulation of the loss and accuracy. The first `WARMUP_STEPS` steps of a run (of a resumed run
too) run eagerly on a side stream, as `torch.cuda.graphs` asks, and the capture follows them.
The CUDA paths here have not yet run on a GPU (benchmarks/throughput.py --anchors measures them).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lbs_tune.config import TrialConfig
from lbs_tune.measuring import untouched
from lbs_tune.models import model_task
from lbs_tune.optim import capture_problem as optimizer_capture_problem
from lbs_tune.optim import state_copies
from lbs_tune.tasks import Task, autocast

# Eager steps before the capture: cuDNN's autotuning, lazy optimizer state and autograd's
# first-run set-up happen there, not in the graph.
WARMUP_STEPS = 3


# ============================================================================ Compile mode


def resolve_compile(
    config: TrialConfig, device: torch.device, precision: str
) -> tuple[str, str | None]:
    """The mode the trial's step runs in ('off', 'default' or 'graphs') and, where that is not
    the one asked for, one line that says why. 'auto' is 'off': no mode has been measured on a
    GPU yet (README, Throughput)."""
    if config.compile == "auto":
        return "off", None
    if config.compile != "graphs":
        return config.compile, None
    problem = capture_problem(config, device, precision)
    if problem:
        return "off", f"compile: graphs runs this trial eagerly: {problem}"
    return "graphs", None


def capture_problem(config: TrialConfig, device: torch.device, precision: str) -> str | None:
    """Why the trial's step cannot be captured in a CUDA graph, or None if it can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device and this trial runs on the {device.type.upper()}"
    if precision == "fp16":
        return "fp16's GradScaler reads its overflow check on the host every step"
    if model_task(config.model) == "language_model":
        return "the language model carries its hidden state from step to step on the host"
    return optimizer_capture_problem(config.optimizer)


class CapturedStep:
    """`step(inputs, targets)` (one whole optimizer step, no host sync) replayed from one CUDA
    graph: called as `captured(inputs, targets, lr)`, it copies the batch into static buffers
    and `lr` into the device tensor the optimizer reads (`lr_tensor`), then replays. The first
    `warmup` calls run the step eagerly on a side stream; the next one captures it."""

    def __init__(self, step: Callable[[Tensor, Tensor], None], lr_tensor: Tensor, warmup: int):
        self.step, self.lr, self.warmup = step, lr_tensor, warmup
        self.inputs: Tensor | None = None
        self.targets: Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.runs = 0

    def __call__(self, inputs: Tensor, targets: Tensor, lr: float) -> None:
        if self.inputs is None:
            # empty_like keeps the memory format: channels_last batches stay so.
            self.inputs, self.targets = torch.empty_like(inputs), torch.empty_like(targets)
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        self.lr.fill_(lr)
        if self.graph is None and self.runs < self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(self.inputs, self.targets)
            torch.cuda.current_stream().wait_stream(side)
            self.runs += 1
            return
        if self.graph is None:
            # The step ends with the gradients set to None, so the captured backward writes
            # them afresh (in the graph's own memory) on every replay.
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.step(self.inputs, self.targets)
        self.graph.replay()


# ============================================================================ Micro-batch


def micro_batch_candidates(batch_size: int, multiple_of: int = 1) -> list[int]:
    """The divisors of `batch_size` that are multiples of `multiple_of` (a ghost batch), in
    increasing order: the micro-batches that split a batch evenly."""
    return [n for n in range(multiple_of, batch_size + 1, multiple_of) if batch_size % n == 0]


def largest_fitting(candidates: Sequence[int], fits: Callable[[int], bool]) -> int | None:
    """The largest of `candidates` (increasing) for which `fits` holds, where `fits` holds up to
    some size and fails above it (memory); None if it fails for the smallest.

    The largest is tried first (one call when the whole batch fits); then from the smallest up,
    each next try the smallest candidate of at least twice the last that fit, until one fails;
    then bisection between the last that fit and the first that failed. Each candidate is
    tried at most once.
    """
    if fits(candidates[-1]):
        return candidates[-1]
    good, bad = None, len(candidates) - 1  # indices: the largest known to fit, smallest not
    i = 0
    while i < bad:
        if not fits(candidates[i]):
            bad = i
            break
        good = i
        i = max(i + 1, bisect.bisect_left(candidates, 2 * candidates[i]))
    if good is None:
        return None
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(candidates[middle]):
            good = middle
        else:
            bad = middle
    return candidates[good]


def fitting_micro_batch(model: nn.Module, task: Task, config: TrialConfig, precision: str) -> int:
    """The largest micro-batch (`micro_batch_candidates` of the batch, multiples of the ghost
    batch) whose forward and backward pass fits the model's GPU beside the optimizer's state,
    in the trial's precision and memory format, on the first training examples.

    The model, its buffers and every random state are left as they were. Raises
    torch.OutOfMemoryError when not even the smallest fits.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    # The optimizer's state does not exist yet: hold its size while probing.
    reserve = state_copies(config.optimizer) * sum(p.numel() * p.element_size() for p in params)
    inputs, targets = task.probe(config.batch_size)

    def one_step(n: int) -> None:
        held = torch.empty(reserve, dtype=torch.uint8, device=device)
        with autocast(device, precision):
            outputs = model(task.inputs(inputs[:n]))
            loss = task.loss(task.logits(outputs), targets[:n])
        torch.autograd.grad(loss, params, allow_unused=True)
        torch.cuda.synchronize(device)
        del held

    def fits(n: int) -> bool:
        try:
            with untouched(model, task.generators):
                one_step(n)
            fitted = True
        except torch.OutOfMemoryError:
            fitted = False
        torch.cuda.empty_cache()  # the next try starts from the same free memory
        return fitted

    ghost = min(config.ghost_batch_size or 1, config.batch_size)
    candidates = micro_batch_candidates(config.batch_size, ghost)
    micro = largest_fitting(candidates, fits)
    if micro is None:
        raise torch.OutOfMemoryError(
            f"not even {candidates[0]} examples fit through {config.model} at once"
        )
    return micro
