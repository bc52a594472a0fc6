"""Weight-space audit (DESIGN.md §5): cheap, always run, computed from S = Σ W0ᵀW0 and T alone.

For a transform T and the source Gram matrix S, ‖R(W0·T, X) − R(W0, Y)‖² = tr((XTᵀ−Y) S (XTᵀ−Y)ᵀ),
so no metric touches the weights again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import erase
from ..erase import ConceptSetMath


@dataclass
class ConceptMetrics:
    concept: str
    guide: str
    erase_residual: float
    attack_recovery: float


@dataclass
class SetMetrics:
    name: str
    concepts: list[ConceptMetrics]
    preserve_drift: dict[str, float]
    probe_drift: dict[str, float]
    round_residuals: list[float] = field(default_factory=list)  # mean erase residual after each step

    @property
    def max_erase_residual(self) -> float:
        return max(c.erase_residual for c in self.concepts)

    @property
    def max_attack_recovery(self) -> float:
        return max(c.attack_recovery for c in self.concepts)

    @property
    def max_preserve_drift(self) -> float:
        return max(self.preserve_drift.values(), default=0.0)


def audit_set(spec: ConceptSetMath, preserve_texts: list[str], probes: dict[str, torch.Tensor],
              transform: torch.Tensor, rounds: list[torch.Tensor], source_gram: torch.Tensor) -> SetMetrics:
    concepts = [ConceptMetrics(t.concept, t.guide,
                               erase.erase_residual(t, transform, source_gram),
                               erase.attack_recovery(t, transform, source_gram, spec.reg))
                for t in spec.targets]
    drift = {text: erase.preserve_drift(e, transform, source_gram)
             for text, e in zip(preserve_texts, spec.preserve)}
    probe = {text: erase.preserve_drift(e, transform, source_gram) for text, e in probes.items()}
    per_round = [sum(erase.erase_residual(t, r, source_gram) for t in spec.targets) / len(spec.targets)
                 for r in rounds]
    return SetMetrics(spec.name, concepts, drift, probe, per_round)

