"""At each evaluation, the verdict: stop or go on, a new best or not, and what adaptive mode changes.

No I/O: the recipe logs and saves on the verdict. It decides from the losses alone, so every process of a
distributed run, judging the same reduced losses, reaches the same verdict at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmbox.plan import TrainingPlan
from llmbox_engine.train.adaptive import adapt
from llmbox_engine.train.autostop import Evaluation, StopDecision, decide, monitored, rules_from_plan
from llmbox_engine.train.state import Progress


@dataclass(frozen=True)
class Verdict:
    decision: StopDecision
    new_best: bool
    adaptive_note: str | None = None

    @property
    def stop_reason(self) -> str | None:
        return self.decision.reason if self.decision.stop else None


class Judge:
    def __init__(self, plan: TrainingPlan) -> None:
        self.rules = rules_from_plan(plan)

    def __call__(self, progress: Progress, evaluation: Evaluation) -> Verdict:
        """Record `evaluation` in `progress` (history, best, adaptive state) and judge it."""
        progress.evaluations.append(evaluation)
        decision = decide(progress.evaluations, self.rules)
        new_best = decision.best_index == len(progress.evaluations) - 1
        if new_best:
            progress.best_val, progress.best_step = monitored(evaluation), evaluation.step
        note = None
        if progress.adaptive is not None and not decision.stop:
            progress.adaptive, note = adapt(progress.evaluations, progress.adaptive)
        return Verdict(decision, new_best, note)

    def best_index(self, progress: Progress) -> int | None:
        return decide(progress.evaluations, self.rules).best_index
