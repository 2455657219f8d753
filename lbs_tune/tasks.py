"""What the training loop asks of each task: a step's batch, the forward pass, the loss, the
scores and the evaluation of a split.

Image classification (images or vectors, one label each), semantic segmentation (images, one
class per pixel, 255 ignored), language modelling (token streams, truncated backpropagation
through time) and the noisy quadratic model (`lbs_tune.quadratic.NoisyQuadraticTask`) differ
only there; the loop of `lbs_tune.training` is the same for all and asks a `Task` made by
`make_task`. The task also fixes what an example is: an image, or for a
language model a token, so `examples` and epochs count tokens there.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lbs_tune.config import TrialConfig, total_steps
from lbs_tune.data import BatchSampler, DeviceData, Split, TokenStreams
from lbs_tune.models import detach_hidden, model_task
from lbs_tune.quadratic import NoisyQuadraticTask, QuadraticData
from lbs_tune.segmentation import IGNORE_INDEX, confusion_matrix, mean_iou, pixel_accuracy

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast(device: torch.device, precision: str, cache: bool = True):
    """The autocast context of `precision` ('bf16', 'fp16', 'fp32') on `device`; `cache` False
    for a step captured in a CUDA graph (the cast weights must not outlive the capture)."""
    dtype = AMP_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


class Task(Protocol):
    """Batching, loss, scores and evaluation of one task, for the loop of one trial."""

    examples_per_step: int  # examples (tokens for a language model) in one optimizer step
    epoch_examples: int  # examples in one epoch
    generators: list[torch.Generator]  # the data's own generators, which measurements restore

    def batch(self, step: int, start: int, size: int) -> tuple[Tensor, Tensor]:
        """The (inputs, targets) of 0-based optimizer step `step`, augmented; steps in order.
        The step takes examples `start` .. `start + size - 1` of the training stream: `size`
        is the batch size at that step (a batch schedule's steps each start where the one
        before ended, at their own size)."""

    def inputs(self, x: Tensor) -> Tensor:
        """What the model takes for batch inputs `x` (images normalised)."""

    def forward(self, model: nn.Module, x: Tensor, chunk: int) -> Tensor:
        """The logits of batch inputs `x`, micro-batch `chunk` of the step (0 without
        accumulation): a language model carries each chunk's hidden state to the next step."""

    def logits(self, outputs: Any) -> Tensor:
        """The logits in what `model(self.inputs(x))` returns (measurements call the model)."""

    def loss(self, logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """The mean cross-entropy of `logits` for targets `y`, a scalar."""

    def scores(self, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor | int]:
        """(right predictions, scored predictions) of a batch, without a host sync."""

    def probe(self, n: int) -> tuple[Tensor, Tensor]:
        """The first `n` training examples, unaugmented: a fixed batch for the sharpness."""

    def evaluate(self, model: nn.Module, split: str, batch_size: int) -> dict[str, float] | None:
        """The metrics of `model` on split 'val' or 'test' ('loss', 'accuracy', ...), in eval
        mode, or None if the dataset has no such split."""

    def state_dict(self) -> dict[str, Any]:
        """Where the data stream stands, for a checkpoint: keys of the loop's state."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from what `state_dict` returned."""


def make_task(
    config: TrialConfig,
    data: DeviceData | TokenStreams | QuadraticData,
    precision: str,
    order_seed: int,
    augment_seed: int,
) -> Task:
    """The task of the config's model, over `data` on its device: its data order (the noisy
    quadratic's noise) is seeded with `order_seed`, its augmentation with `augment_seed`."""
    task = model_task(config.model)
    if task == "nqm":
        return NoisyQuadraticTask(config, data, order_seed)
    if task == "language_model":
        return LanguageModel(config, data, precision)
    kind = Segmentation if task == "segmentation" else Classification
    return kind(config, data, precision, order_seed, augment_seed)


def budget_steps(config: TrialConfig, task: Task) -> int:
    """The trial's budget in optimizer steps, counted in the task's examples (`total_steps`
    with a step of `examples_per_step` examples and an epoch of `epoch_examples`)."""
    if task.examples_per_step != config.batch_size:
        config = config.model_copy(update={"batch_size": task.examples_per_step})
    return total_steps(config, task.epoch_examples)


# ============================================================================ Classification


@torch.no_grad()
def evaluate(
    model: nn.Module, data: DeviceData, split: Split, batch_size: int, precision: str
) -> tuple[float, float]:
    """(mean loss, accuracy) of classifier `model` on `split`, in eval mode; one
    synchronisation."""
    was_training = model.training
    model.eval()
    device = split.y.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for x, y in data.eval_batches(split, batch_size):
        with autocast(device, precision):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    return loss_sum.item() / len(split), correct.item() / len(split)


class Classification:
    """Images or vectors, one label each: batches of the seeded `BatchSampler`, augmented."""

    def __init__(
        self,
        config: TrialConfig,
        data: DeviceData,
        precision: str,
        order_seed: int,
        augment_seed: int,
    ) -> None:
        device = data.train.y.device
        self.data, self.precision = data, precision
        self.examples_per_step = config.batch_size
        self.epoch_examples = len(data.train)
        self.sampler = BatchSampler(len(data.train), config.batch_size, order_seed, device)
        self.augment = torch.Generator(device=device).manual_seed(augment_seed)
        self.generators = [self.augment]

    def batch(self, step: int, start: int, size: int) -> tuple[Tensor, Tensor]:
        return self.data.train_batch(self.sampler.rows(start, size), self.augment)

    def inputs(self, x: Tensor) -> Tensor:
        return self.data.normalise(x)

    def forward(self, model: nn.Module, x: Tensor, chunk: int) -> Tensor:
        return model(self.inputs(x))

    def logits(self, outputs: Tensor) -> Tensor:
        return outputs

    def loss(self, logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)

    def scores(self, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor | int]:
        return (logits.argmax(1) == y).sum(), len(y)

    def probe(self, n: int) -> tuple[Tensor, Tensor]:
        return self.data.train.x[:n], self.data.train.y[:n]

    def evaluate(self, model: nn.Module, split: str, batch_size: int) -> dict[str, float] | None:
        part = getattr(self.data, split)
        if part is None:
            return None
        loss, accuracy = evaluate(model, self.data, part, batch_size, self.precision)
        return {"loss": loss, "accuracy": accuracy}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "augment": self.augment.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.augment.set_state(state["augment"])


# ============================================================================ Segmentation


class Segmentation(Classification):
    """Images with a class per pixel (255: ignore), batched and augmented as classification,
    the crop and flip of each image applied to its mask. The loss and the accuracy are over the
    pixels not ignored; evaluation adds the mean IoU (`lbs_tune.segmentation`)."""

    def loss(self, logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
        y = y.long()
        total = F.cross_entropy(
            logits, y, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing
        )
        # A crop of ignored pixels only has loss 0, not the 0 / 0 that would read as divergence.
        return total / (y != IGNORE_INDEX).sum().clamp_min(1)

    def scores(self, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor | int]:
        scored = y != IGNORE_INDEX
        return ((logits.argmax(1) == y) & scored).sum(), scored.sum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, batch_size: int) -> dict[str, float] | None:
        """Loss per scored pixel, pixel accuracy (also as 'accuracy') and mean IoU, from one
        confusion matrix over the whole split (as Cityscapes is scored)."""
        part = getattr(self.data, split)
        if part is None:
            return None
        was_training = model.training
        model.eval()
        device = part.y.device
        classes = self.data.num_classes
        confusion = torch.zeros((classes, classes), dtype=torch.int64, device=device)
        loss_sum = torch.zeros((), device=device)
        for x, y in self.data.eval_batches(part, batch_size):
            with autocast(device, self.precision):
                logits = model(x)
            loss_sum += F.cross_entropy(
                logits.float(), y.long(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            confusion += confusion_matrix(logits.argmax(1), y, classes)
        model.train(was_training)
        scored = confusion.sum().item()
        accuracy = pixel_accuracy(confusion)
        return {
            "loss": loss_sum.item() / scored if scored else math.nan,
            "accuracy": accuracy,
            "pixel_accuracy": accuracy,
            "miou": mean_iou(confusion),
        }


# ============================================================================ Language model


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows a float."""
    return math.exp(loss) if loss < 709 else math.inf


class LanguageModel:
    """A token stream read as B parallel rows, B windows of bptt tokens per step (truncated
    backpropagation through time, as PyTorch's word_language_model example).

    The training tokens are laid out as B rows of T // B tokens (the tail dropped, no
    shuffling); step s reads the window at column (s mod spe) x bptt of every row, the next
    tokens its targets, where spe = (T // B - 1) // bptt steps make one epoch. The hidden state
    carries from each window to the next, its graph cut after every step, and restarts from
    zero with each epoch. Evaluation reads a split as `batch_size` rows (the example: 10) in
    windows of bptt with the state carried, and reports the loss per token and its perplexity.
    """

    def __init__(self, config: TrialConfig, data: TokenStreams, precision: str) -> None:
        self.data, self.precision = data, precision
        rows, self.bptt = config.batch_size, config.data.bptt
        tokens = len(data.train)
        self.stream = data.train[: tokens // rows * rows].view(rows, -1)
        self.epoch_steps = (tokens // rows - 1) // self.bptt
        self.examples_per_step = rows * self.bptt
        self.epoch_examples = self.epoch_steps * self.examples_per_step
        self.chunks = rows // config.micro_batch_size
        self.hidden: list[tuple[Tensor, Tensor] | None] = [None] * self.chunks  # None: zeros
        self.generators: list[torch.Generator] = []

    def batch(self, step: int, start: int, size: int) -> tuple[Tensor, Tensor]:
        # A window of every row of the token stream (a language model has no batch schedule).
        first = step % self.epoch_steps * self.bptt
        if first == 0:
            self.hidden = [None] * self.chunks
        window = self.stream[:, first : first + self.bptt + 1]
        return window[:, :-1], window[:, 1:]

    def inputs(self, x: Tensor) -> Tensor:
        return x

    def forward(self, model: nn.Module, x: Tensor, chunk: int) -> Tensor:
        logits, hidden = model(x, self.hidden[chunk])
        self.hidden[chunk] = detach_hidden(hidden)
        return logits

    def logits(self, outputs: tuple[Tensor, Any]) -> Tensor:
        # A measurement runs each window from the zero state: it has no state of its own.
        return outputs[0]

    def loss(self, logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), label_smoothing=label_smoothing)

    def scores(self, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor | int]:
        return (logits.argmax(-1) == y).sum(), y.numel()

    def probe(self, n: int) -> tuple[Tensor, Tensor]:
        tokens = self.data.train[: n * self.bptt + 1]
        return tokens[:-1].view(n, self.bptt), tokens[1:].view(n, self.bptt)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, batch_size: int) -> dict[str, float] | None:
        tokens = getattr(self.data, split)
        if tokens is None:
            return None
        rows = min(batch_size, len(tokens) // 2)  # every row holds a token and its next
        stream = tokens[: len(tokens) // rows * rows].view(rows, -1)
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), device=tokens.device)
        correct = torch.zeros((), device=tokens.device, dtype=torch.int64)
        hidden = None
        for start in range(0, stream.shape[1] - 1, self.bptt):
            window = stream[:, start : start + self.bptt + 1]
            x, y = window[:, :-1], window[:, 1:]
            with autocast(tokens.device, self.precision):
                logits, hidden = model(x, hidden)
            loss_sum += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            correct += (logits.argmax(-1) == y).sum()
        model.train(was_training)
        count = rows * (stream.shape[1] - 1)
        loss = loss_sum.item() / count
        return {"loss": loss, "accuracy": correct.item() / count, "perplexity": perplexity(loss)}

    def state_dict(self) -> dict[str, Any]:
        # The stream's position is the step; the state carried into the next window is not.
        return {"sampler": {"hidden": self.hidden}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.stream.device
        self.hidden = [
            None if h is None else tuple(t.to(device) for t in h)
            for h in state["sampler"]["hidden"]
        ]
