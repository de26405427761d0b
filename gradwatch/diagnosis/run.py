"""`RunDiagnosis`: what the rules remember of a run (its statistics records, summaries and
findings), what cannot wait for an epoch's end, and the state a resumed run restores."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..summary import EXTRA, JUMP_READINGS, EpochSummary, jumped, loop_summary
from .findings import RULES, Finding
from .gradients import nonfinite_gradients
from .loss import diverging
from .story import record
from .thresholds import Thresholds

# What the rules keep of a run: at most MAX_HISTORY summaries, the first and the latest RECENT
# always, every other one of those between dropped whenever there are more (so that over a million
# steps the older windows thin out, and memory and state_dict() stay flat)
MAX_HISTORY = 128


RECENT = 32


def thinned(items: list, limit: int, recent: int) -> list:
    """`items` if there are at most `limit`; else the first, every other one of the middle, and the
    latest `recent`."""
    if len(items) <= limit:
        return items
    return [items[0], *items[1:-recent][1::2], *items[-recent:]]


class RunDiagnosis:
    """What the rules remember of a run: the statistics records since the last summary, the
    summaries so far (oldest first: one per finished epoch, or per window of steps in a loop that
    calls no epoch_end) and the findings so far."""

    def __init__(self, thresholds: Thresholds | None = None, findings: Iterable[Finding] = ()):
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            kind = type(thresholds).__name__
            raise TypeError(f"thresholds must be a gradwatch.Thresholds, got {kind}")
        self.thresholds = thresholds or Thresholds()
        self.records: list[dict] = []
        self.jumps: list[dict] = []  # the readings since the last summary at which layers jumped
        self.history: list[EpochSummary] = []
        self.findings: list[Finding] = list(findings)
        # what the run is, as plain values for diagnosis.json: the model and optimizer ("model"),
        # the loss's graph and the first batch ("loss")
        self.facts: dict[str, Any] = {}
        self.told: set[tuple] = set()  # the keys of the findings an epoch_end has returned
        self.objective = ""  # given to watch(); "" to recognise it from the loss's graph
        self.part = ""  # the name of the model diagnosed, where one monitor watches several

    def next_epoch(self) -> int:
        """The epoch (window) after the last one summarised: where a resumed run begins again."""
        return self.history[-1].epoch + 1 if self.history else 0

    @property
    def has_epochs(self) -> bool:
        """Whether an epoch was summarised: from then on, the loop's epochs make the summaries."""
        return bool(self.history) and self.history[-1].unit == "epoch"

    def readings(self) -> int:
        """The statistics records taken since the last window of steps, past the first steps after
        watch() (with epochs, 0)."""
        if self.has_epochs:
            return 0
        since = self.history[-1].step if self.history else -1
        loops = [record["loop"] for record in self.records]
        return sum(loop["step"] > since and not loop.get("first") for loop in loops)

    def undiagnosed(self) -> bool:
        """Whether readings wait for a diagnosis: taken since the last window of steps, or, in a run
        not diagnosed yet, the first steps' (a run that stops early has their facts)."""
        return bool(self.readings() or not self.history and self.records)

    def keep(self, record: dict, limit: int) -> None:
        """Add a statistics record; past `limit` records, the older half thins out. Whether its
        layers jumped against the last summary is kept apart, for the first JUMP_READINGS."""
        settled = self.history and not record["loop"].get("first")  # no jump from a first step
        found = jumped(record, self.history[-1].layers) if settled else None
        if found and len(self.jumps) < JUMP_READINGS:
            self.jumps.append(found)
        self.records = thinned([*self.records, record], limit, limit // 2)

    def urgent(
        self, step: int, stats: Mapping[str, dict], losses: list[dict], first_loss: float | None
    ) -> list[Finding]:
        """What cannot wait for the epoch's end, from one statistics record and the latest loss
        windows: non-finite gradients, then a diverging or non-finite loss."""
        layers = {name: values for name, values in stats.items() if name not in EXTRA}
        since = self.history[-1].step if self.history else -1
        records = [r for r in self.records if r.get("loop", {}).get("step", 0) > since]
        now = EpochSummary(self.next_epoch(), step, layers=layers, losses=losses)
        now.first_loss = first_loss
        now.loop = self._with_graph(loop_summary(records))
        found = nonfinite_gradients([now], self.thresholds)
        found += diverging([*self.history, now], self.thresholds)  # from where the run started
        for declaration in (d for d in RULES.values() if d.exact):
            found += declaration([*self.history[-1:], now], self.thresholds)
        return self._named(found)

    def _with_graph(self, loop: dict[str, Any]) -> dict[str, Any]:
        """The loop facts of a summary, with the loss's graph as last read where none of its
        readings read it (the graph is read once, and stays what it was), the model's dropout rates
        and the optimizer's class (read at watch()), and the objective: as given to watch(), or
        "other" where the graph shows a loss not made by known loss functions alone."""
        if not loop.get("graph") and self.facts.get("loss"):
            loop["graph"] = self.facts["loss"]
        model = self.facts.get("model", {})
        loop["dropout"] = model.get("dropout", [])
        loop["optimizer"] = model.get("optimizer", {}).get("class")
        made_of_losses = loop.get("graph", {}).get("made_of_losses")
        loop["objective"] = self.objective or ("other" if made_of_losses is False else "")
        self.facts["objective"] = loop["objective"] or "a loss to minimise"
        return loop

    def _named(self, findings: list[Finding]) -> list[Finding]:
        """`findings`, each named by the part diagnosed (if any)."""
        for finding in findings:
            finding.part = self.part
        return findings

    def untold(self) -> list[Finding]:
        """The findings no epoch_end has returned yet (also those a window of steps inside the
        epoch found first), in the order they began; they count as told from now on."""
        new = [f for f in self.findings if f.key not in self.told]
        self.told.update(f.key for f in new)
        return new

    def add(self, summary: EpochSummary, guard: Callable[[str], Any]) -> list[Finding]:
        """Summary `summary` added to the history; every rule, each under `guard`, on the history,
        and the findings merged into the run's. Returns the findings that began. The first epoch
        after windows of steps replaces them (their findings are kept, as found in that epoch)."""
        if summary.unit == "epoch" and self.history and not self.has_epochs:
            summary.first_loss = self.history[0].first_loss
            for finding in self.findings:
                finding.unit = "epoch"
                finding.epoch = finding.last_epoch = summary.epoch
            self.history = []
        summary.loop = self._with_graph(summary.loop)
        summary.loop.setdefault("jumps", self.jumps)
        self.jumps = []
        self.history = thinned([*self.history, summary], MAX_HISTORY, RECENT)
        found = []
        for declaration in RULES.values():
            with guard(f"the {declaration.name} rule"):
                found += declaration(self.history, self.thresholds)
        self.findings, begun = record(self.findings, self._named(found), summary.epoch)
        return begun

    def conclude(self, guard: Callable[[str], Any]) -> list[Finding]:
        """The run ended (close()): the rules that judge a run as a whole (Rule.at_end), each under
        `guard`, read its history once more, the latest summary marked "ended" in its loop facts.
        Returns the findings that began."""
        if not self.history or self.history[-1].loop.get("ended"):
            return []
        now = self.history[-1]
        now.loop["ended"] = True
        found = []
        for declaration in (d for d in RULES.values() if d.at_end):
            with guard(f"the {declaration.name} rule at the run's end"):
                found += declaration(self.history, self.thresholds)
        self.findings, begun = record(self.findings, self._named(found), now.epoch)
        return begun

    def state_dict(self) -> dict[str, Any]:
        history = [summary.to_dict() for summary in self.history]
        findings = [finding.to_json() for finding in self.findings]
        state = {"history": history, "records": list(self.records), "findings": findings}
        return {**state, "jumps": list(self.jumps), "facts": dict(self.facts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = [EpochSummary.from_dict(summary) for summary in state["history"]]
        self.records = list(state["records"])
        self.jumps = list(state.get("jumps", []))
        self.findings = [Finding.from_json(item) for item in state["findings"]]
        self.facts = {**dict(state.get("facts", {})), **self.facts}  # those read since watch() win
        self.told = {f.key for f in self.findings}
