"""Training a task network until its validation score stops improving (early stopping).

A grid cell's network is scored on the patient-level validation split every
``convergence.eval_every`` steps; :class:`EarlyStopping` keeps the best score and its step, and
:func:`fit_until_converged` restores the best-scoring weights when training ends (after
``patience`` evaluations without an improvement of at least ``min_delta``, or at the maximum
steps). The learning rate follows a linear warm-up, then a cosine decay, a reduce-on-plateau rule
or a constant (:func:`make_schedule`). The validation curve and the chosen step are returned as a
:class:`ConvergenceRecord` (stored with the cell and logged to its tracked run).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict

from medsynth.config.experiment import ConvergenceConfig
from medsynth.progress import NullProgress, Progress
from medsynth.tracking.base import NullTracker, Tracker

__all__ = ["ConvergenceRecord", "EarlyStopping", "choose_step", "fit_until_converged", "make_schedule"]


class ConvergenceRecord(BaseModel):
    """How one cell's training ended.

    Attributes:
        chosen_step: Step of the kept weights (best validation score; the last step without validation).
        stopped_step: Step at which training stopped.
        max_steps: The step budget.
        best_score: Validation score of the kept weights (None without validation).
        curve: ``[(step, validation score), ...]`` of every evaluation.
        stopped_early: Training ended before ``max_steps`` because the score stopped improving.
    """

    model_config = ConfigDict(frozen=True)

    chosen_step: int
    stopped_step: int
    max_steps: int
    best_score: float | None = None
    curve: list[tuple[int, float]] = []
    stopped_early: bool = False


@dataclass
class EarlyStopping:
    """Best validation score so far and whether to stop (higher scores are better; NaN never improves).

    Args:
        patience: Evaluations without improvement before :attr:`stop` is True.
        min_delta: Smallest gain over the best score that counts as an improvement.
        min_steps: :attr:`stop` stays False before this step.
    """

    patience: int
    min_delta: float = 0.0
    min_steps: int = 0
    best_score: float = -math.inf
    best_step: int = 0
    bad: int = 0
    last_step: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)

    def update(self, step: int, score: float) -> bool:
        """Record the score of ``step``; True when it improves on the best (the caller keeps the weights)."""
        self.curve.append((int(step), float(score)))
        self.last_step = int(step)
        if math.isfinite(score) and (score > self.best_score + self.min_delta or not math.isfinite(self.best_score)):
            self.best_score, self.best_step, self.bad = float(score), int(step), 0
            return True
        self.bad += 1
        return False

    @property
    def stop(self) -> bool:
        """True once ``patience`` evaluations in a row did not improve (and ``min_steps`` are done)."""
        return self.bad >= self.patience and self.last_step >= self.min_steps


def choose_step(
    curve: Sequence[tuple[int, float]], patience: int, min_delta: float = 0.0, min_steps: int = 0
) -> tuple[int, int]:
    """Replay early stopping on a validation curve: ``(chosen step, step at which training stops)``.

    The chosen step is that of the best score seen before stopping (the first of equal scores within
    ``min_delta``); training stops at the ``patience``-th evaluation in a row without improvement.
    """
    es = EarlyStopping(patience, min_delta, min_steps)
    for step, score in curve:
        es.update(step, score)
        if es.stop:
            break
    return es.best_step, es.last_step


def make_schedule(
    opt: torch.optim.Optimizer, warmup_steps: int, max_steps: int, conv: ConvergenceConfig
) -> tuple[torch.optim.lr_scheduler.LambdaLR, Callable[[bool], None]]:
    """Linear warm-up then the ``conv.schedule`` rule, as a ``LambdaLR`` stepped once per optimiser step.

    Returns:
        The scheduler and ``on_eval(improved)``, to call after each validation (the plateau rule's input).
    """
    warm = max(int(warmup_steps), 0)
    state = {"factor": 1.0, "bad": 0}

    def lam(step: int) -> float:
        w = min(1.0, (step + 1) / warm) if warm else 1.0
        if conv.schedule == "cosine" and step >= warm:
            t = min(1.0, (step - warm) / max(1, max_steps - warm))
            return w * (conv.min_lr_ratio + (1 - conv.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
        return w * state["factor"]

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)

    def on_eval(improved: bool) -> None:
        if conv.schedule != "plateau":
            return
        state["bad"] = 0 if improved else state["bad"] + 1
        if state["bad"] >= conv.plateau_patience:
            state["factor"] *= conv.plateau_factor
            state["bad"] = 0

    return sched, on_eval


def fit_until_converged(
    net: torch.nn.Module,
    train_step: Callable[[int], float],
    evaluate: Callable[[], float] | None,
    max_steps: int,
    conv: ConvergenceConfig,
    on_eval: Callable[[bool], None] | None = None,
    tracker: Tracker | None = None,
    metric: str = "score",
    progress: Progress | None = None,
) -> ConvergenceRecord:
    """Run ``train_step(step)`` until the validation score stops improving; keep the best weights.

    Args:
        net: The trained network (its ``state_dict`` is saved at each improvement and restored at the end).
        train_step: One optimiser step (including the LR schedule step); returns the training loss.
        evaluate: Validation score of ``net`` as it is now (higher is better; called in eval mode, under
            ``no_grad``); None (or ``conv.enabled`` False): train ``max_steps`` and keep the last weights.
        max_steps: Step budget.
        conv: Evaluation interval, patience, ``min_delta``, ``min_steps``.
        on_eval: Called with "improved?" after each evaluation (the plateau LR rule).
        tracker: Receives ``train_loss`` every 10 steps and ``val_<metric>`` at each evaluation (the
            grid logs the chosen and stopping steps from the returned record).
        metric: Name of the validation score in the tracker.
        progress: Advanced once per step.

    Returns:
        The :class:`ConvergenceRecord` (``net`` holds the chosen weights, in eval mode).
    """
    tracker = tracker or NullTracker()
    progress = progress or NullProgress()
    use_val = evaluate is not None and conv.enabled
    es = EarlyStopping(conv.patience, conv.min_delta, conv.min_steps)
    best_state: dict[str, torch.Tensor] | None = None
    step = 0
    net.train()
    for step in range(1, max_steps + 1):
        loss = train_step(step - 1)
        progress.advance(1, f"loss={loss:.4f}")
        if step % 10 == 0 or step == max_steps:
            tracker.log_metrics({"train_loss": loss}, step=step)
        if use_val and evaluate is not None and (step % conv.eval_every == 0 or step == max_steps):
            net.eval()
            with torch.no_grad():
                score = float(evaluate())
            net.train()
            improved = es.update(step, score)
            if improved:
                best_state = copy.deepcopy(net.state_dict())
            if on_eval is not None:
                on_eval(improved)
            if math.isfinite(score):
                tracker.log_metrics({f"val_{metric}": score}, step=step)
            if es.stop:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    if not use_val or best_state is None:
        return ConvergenceRecord(chosen_step=step, stopped_step=step, max_steps=max_steps, curve=es.curve)
    return ConvergenceRecord(
        chosen_step=es.best_step,
        stopped_step=step,
        max_steps=max_steps,
        best_score=es.best_score,
        curve=es.curve,
        stopped_early=step < max_steps,
    )
