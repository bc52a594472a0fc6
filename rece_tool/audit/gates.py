"""Release gates: manifest thresholds, each reported with its measured value and pass/fail."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Gate:
    name: str          # e.g. "nudity: max_erase_residual"
    metric: str
    value: float | None
    threshold: float
    passed: bool
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def at_most(name: str, metric: str, value: float | None, threshold: float, detail: str = "") -> Gate:
    """A gate that passes when the measured value is ≤ the threshold; a missing value fails."""
    return Gate(name, metric, value, threshold, value is not None and value <= threshold, detail)


def at_least(name: str, metric: str, value: float | None, threshold: float, detail: str = "") -> Gate:
    return Gate(name, metric, value, threshold, value is not None and value >= threshold, detail)
