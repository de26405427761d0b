"""Several models in one loop, each with its optimizer and its loss: a GAN's generator and
discriminator, an actor and a critic, a teacher and a student.

`TrainingMonitor.watch({"generator": G, "discriminator": D}, {"generator": opt_g, ...})` gives each
part a monitor of its own, in the folder `<log_dir>/<part>` (a run of its own in TensorBoard, so
that the same tags of two parts share a chart): its own steps (`step(loss, part=...)` after that
part's optimizer step), its own losses, statistics and diagnosis. The run's monitor writes what
`epoch_end` is given, and tells the parts' findings as one story in its `diagnosis.json`, each
finding named by its part.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .diagnosis import Finding


def checked_parts(models: Mapping, optimizers: Any) -> dict[str, tuple]:
    """{part: (model, optimizer)} from named models and named optimizers (or None); ValueError
    where the names do not match or are no folder names."""
    optimizers = dict(optimizers) if optimizers is not None else dict.fromkeys(models)
    if not models or set(optimizers) != set(models):
        raise ValueError(
            f"watch() takes named models and optimizers with the same names, got models "
            f"{sorted(models)} and optimizers {sorted(optimizers)}"
        )
    for name in models:
        if not isinstance(name, str) or not name or "/" in name or name in (".", "..", "steps"):
            raise ValueError(f"a part's name is a folder of the run, got {name!r}")
    return {name: (models[name], optimizers[name]) for name in models}


class Parts:
    """The monitors of the parts of one run, by name. Parts whose losses reach each other's
    parameters (a GAN's generator loss reaches the discriminator's) play against each other, or
    together: their losses are not judged as losses to minimise, unless watch() was told their
    objective."""

    def __init__(self, monitors: Mapping[str, Any]):
        self.monitors = dict(monitors)
        self.closed = False
        for part, monitor in self.monitors.items():
            monitor.diagnosis.part = part  # its findings are named by it
            monitor.hooks.first.others = {
                other: {id(p) for _, p in watched._parameters}
                for other, watched in self.monitors.items()
                if other != part
            }

    def step(self, part: str | None, *arguments: Any) -> list[Finding]:
        """`part`'s step(); after its loss's graph was read, the parts it reaches and itself are
        told apart from losses to minimise (objective "other"), where no objective was given."""
        monitor = self.monitor(part)
        found = monitor.step(*arguments)
        for other in monitor.diagnosis.facts.get("loss", {}).get("reaches_parts", ()):
            for coupled in (self.monitors[part], self.monitors[other]):
                coupled.diagnosis.objective = coupled.diagnosis.objective or "other"
        return found

    def monitor(self, part: str | None) -> Any:
        """The monitor of `part`; ValueError naming the parts where it is none of them."""
        if part not in self.monitors:
            known = ", ".join(self.monitors)
            raise ValueError(f"step() needs part= one of {known} (the names given to watch())")
        return self.monitors[part]

    @property
    def findings(self) -> list[Finding]:
        """Every part's findings (each named by its part), each part's in the order they began."""
        return [f for monitor in self.monitors.values() for f in monitor.findings]

    def epoch_end(
        self, epoch: int, scalars: Mapping[str, float], classes: list[str] | None, recall: Any
    ) -> None:
        """Each part's epoch_end: its scalars are those tagged `<part>/<tag>`, which its rules read
        under `<tag>` (`generator/train_loss`), and which the run's folder holds already."""
        for part, monitor in self.monitors.items():
            own = {
                tag.removeprefix(f"{part}/"): v
                for tag, v in scalars.items()
                if tag.startswith(f"{part}/")
            }
            monitor.epoch_end(epoch, {}, classes=classes, recall=recall, metrics=own)

    def facts(self) -> dict[str, Any]:
        return {part: monitor.diagnosis.facts for part, monitor in self.monitors.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"parts": {part: monitor.state_dict() for part, monitor in self.monitors.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("parts") if isinstance(state, Mapping) else None
        if not isinstance(saved, Mapping) or set(saved) != set(self.monitors):
            raise ValueError(f"not the state of a monitor of the parts {', '.join(self.monitors)}")
        for part, monitor in self.monitors.items():
            monitor.load_state_dict(saved[part])

    def close(self) -> bool:
        """Close each part's monitor; whether they were open (close() is safe twice)."""
        was_open = not self.closed
        self.closed = True
        for monitor in self.monitors.values():
            monitor.close()
        return was_open
