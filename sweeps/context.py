"""What every process of a sweep shares: the resolved config, storage, tracking URI, parent runs.

The context travels to worker processes as a JSON file, so each worker rebuilds exactly the same
sweep (loading the same loss plugins first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import SweepConfig, sweep_from_dict
from .space import SearchSpace, build_space


def study_name(sweep: str, loss: str) -> str:
    """The Optuna study of ``loss`` in sweep ``sweep``: ``<sweep>/<loss>``."""
    return f"{sweep}/{loss}"


@dataclass
class SweepContext:
    sweep: SweepConfig
    storage: str  # journal file path or SQLAlchemy URL
    tracking_uri: str
    sweep_dir: Path  # runs/<sweep name>/
    plugins: tuple[str, ...] = ()  # --plugin specs, loaded in every worker (sweep.plugins too)
    parents: dict[str, str] = field(default_factory=dict)  # loss -> parent MLflow run id

    def study_name(self, loss: str) -> str:
        return study_name(self.sweep.name, loss)

    def space(self, loss: str) -> SearchSpace:
        return build_space(loss, self.sweep.search, self.sweep.loss_overrides.get(loss))

    def budget(self, loss: str) -> int:
        """Trials for ``loss``: the sweep's ``trials``, or 1 when nothing is tuned (all fixed)."""
        return self.sweep.trials if self.space(loss).dimensions else 1

    @property
    def lock_path(self) -> Path:
        return self.sweep_dir / "budget.lock"

    def to_json(self) -> str:
        return json.dumps(
            {
                "sweep": self.sweep.to_dict(),
                "storage": self.storage,
                "tracking_uri": self.tracking_uri,
                "sweep_dir": str(self.sweep_dir),
                "plugins": list(self.plugins),
                "parents": self.parents,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "SweepContext":
        data: dict[str, Any] = json.loads(text)
        from losses import load_plugins

        load_plugins(data["plugins"])
        return cls(
            sweep_from_dict(data["sweep"]),
            data["storage"],
            data["tracking_uri"],
            Path(data["sweep_dir"]),
            tuple(data["plugins"]),
            dict(data["parents"]),
        )
