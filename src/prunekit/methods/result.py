"""What every method returns: the plan, costs before/after, and method metrics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..cost.macs import Cost
from ..surgery.plan import Plan


@dataclass
class PruneResult:
    plan: Plan
    cost_before: Cost
    cost_after: Cost
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def macs_ratio(self) -> float:
        """before / after: '2.0' means twice fewer MACs."""
        return self.cost_before.macs / max(self.cost_after.macs, 1)

    @property
    def params_ratio(self) -> float:
        return self.cost_before.params / max(self.cost_after.params, 1)

    @property
    def macs_fraction(self) -> float:
        """after / before: the share of MACs that remains."""
        return self.cost_after.macs / max(self.cost_before.macs, 1)

    @property
    def params_fraction(self) -> float:
        return self.cost_after.params / max(self.cost_before.params, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "cost_before": self.cost_before.to_dict(),
                "cost_after": self.cost_after.to_dict(), "config": self.config, "metrics": self.metrics,
                "macs_ratio": self.macs_ratio, "params_ratio": self.params_ratio,
                "macs_fraction": self.macs_fraction, "params_fraction": self.params_fraction}
