"""Where the monitor's output goes: event files and the run folder's files, written by one process.

`NullSink` is the interface, and the sink of a process that does not write (a torch.distributed rank
other than 0): every call does nothing. `EventSink` writes. Epochs and optimizer steps are two step
axes, so each gets its own event folder (a tag keeps one axis): epochs in `log_dir`, optimizer steps
in `log_dir/steps`. A writer opens at its first write, or at `open()`: until then the steps from
which a resumed run rewrites each axis can still be set with `resume_at`.

The sink is given epochs as indices from 0 (`for epoch in range(epochs)`) and writes epoch N at
step N + 1 (`axis_step`), so that TensorBoard's epoch axis counts epochs as the console, the story,
diagnosis.json and the pictures do: the first is epoch 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.summary import histogram_raw
from tensorboardX.summary import hparams as hparams_summaries

from .histograms import Histogram
from .layout import custom_scalars
from .summary import summary_lines

ERRORS = "gradwatch-errors.log"


def axis_step(step: int, per_step: bool) -> int:
    """The step an event is written at: an optimizer step as it is, an epoch's index plus one."""
    return step if per_step else step + 1


# scalars charted only from their first reading that is not zero: a share of non-finite values, or
# of values an optimizer step left as they were, is 0 for the whole of most healthy runs, and ten
# flat charts of it would bury the ones that move
HIDDEN_WHILE_ZERO = ("nonfinite_share/", "unchanged_share/")
STUCK_SECONDS = 10  # how long the event writer's full queue may take to drain, before it is stuck


def _thread_and_queue(writer: SummaryWriter) -> tuple[Any, Any]:
    """tensorboardX's writer thread and its queue of events behind `writer` (None, None where a
    version of it has other names)."""
    events = writer.file_writer.event_writer
    return getattr(events, "_worker", None), getattr(events, "_event_queue", None)


class SafeRecords:
    """tensorboardX's record writer (the event file) with its failures kept rather than raised: on a
    full disk its thread lives on, dropping events, and its atexit flush prints no traceback; the
    sink reads `error` and says it once."""

    def __init__(self, records: Any):
        self.records = records
        self.path = getattr(records, "path", None)
        self.error: OSError | None = None

    def _do(self, name: str, *args: Any) -> None:
        if self.error is None:
            try:
                getattr(self.records, name)(*args)
            except OSError as err:
                self.error = err

    def write(self, data: bytes) -> None:
        self._do("write", data)

    def flush(self) -> None:
        self._do("flush")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.records.close()


def guarded(writer: SummaryWriter) -> SafeRecords | None:
    """Put SafeRecords under `writer`'s event file (None where a version of tensorboardX has other
    names)."""
    events = getattr(writer.file_writer.event_writer, "_ev_writer", None)
    records = getattr(events, "_py_recordio_writer", None)
    if records is None:
        return None
    events._py_recordio_writer = SafeRecords(records)
    return events._py_recordio_writer


def open_writer(
    folder: str, purge_step: int | None, flush_secs: int, layout: bool
) -> SummaryWriter:
    """A writer of one axis; `layout`: with the Custom Scalars layout (the epoch axis's)."""
    # Event file names hold the time in whole seconds; a nanosecond suffix keeps a run resumed
    # within the same second from overwriting the file it continues, and sorts it after it.
    writer = SummaryWriter(
        folder, purge_step=purge_step, flush_secs=flush_secs, filename_suffix=f".{time.time_ns()}"
    )
    if layout:
        writer.add_custom_scalars(custom_scalars())
    return writer


def stopped_writer(writer: SummaryWriter) -> str | None:
    """Why `writer` can take no more events, or None while it works: its thread died (an error
    writing the event file, such as a full disk; tensorboardX's queue would then block the next
    writes for ever), or its queue stayed full for STUCK_SECONDS."""
    worker, pending = _thread_and_queue(writer)
    if worker is None or pending is None:
        return None
    deadline = time.monotonic() + STUCK_SECONDS
    while worker.is_alive() and pending.full() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not worker.is_alive():
        return "its thread stopped on an error writing the event file (a full disk?)"
    return f"its queue did not drain in {STUCK_SECONDS} s" if pending.full() else None


def drained(writer: SummaryWriter, seconds: float = STUCK_SECONDS) -> None:
    """Wait until `writer`'s thread has taken every queued event (for at most `seconds`)."""
    worker, pending = _thread_and_queue(writer)
    deadline = time.monotonic() + seconds
    while worker is not None and pending is not None and worker.is_alive() and not pending.empty():
        if time.monotonic() > deadline:
            return
        time.sleep(0.005)


def kept_lines(path: str, before_step: int) -> list[str]:
    """The lines of a summaries file whose summary (or run's end) is before `before_step`: what a
    run resumed from there keeps (a line cut short by a kill, or damaged, is dropped; so is the end
    of the run resumed, at its last step)."""
    lines, _ = summary_lines(path)
    kept = []
    for line in lines:
        step = line.get("summary", line.get("ended")).get("step")
        if isinstance(step, (int, float)) and step < before_step:
            kept.append(json.dumps(line) + "\n")
    return kept


def _scalar_values(scalars: Mapping[str, float]) -> list[Summary.Value]:
    return [Summary.Value(tag=tag, simple_value=float(value)) for tag, value in scalars.items()]


def _histogram_value(tag: str, h: Histogram) -> Summary.Value:
    limits = h.bucket_limits.tolist()
    counts = h.bucket_counts.tolist()
    return histogram_raw(tag, h.min, h.max, h.num, h.sum, h.sum_squares, limits, counts).value[0]


class RunFiles:
    """The run folder's own files (diagnosis.json, the pictures, the summaries, the error log):
    each written to a temporary name and renamed over the old one, or appended to and cut back
    where the append fails, so that a kill or a full disk midway leaves every file as it was. The
    first failure is given to `on_failure(path, error)`, and nothing more is written."""

    def __init__(self, log_dir: str, on_failure: Any):
        self.log_dir = log_dir
        self.on_failure = on_failure
        self.failed: str | None = None  # the file that could not be written

    def replaced(self, name: str, write: Any) -> None:
        """`write(path)` of the run folder's file `name` to a temporary name, then renamed over it:
        a kill or a full disk midway leaves the file as it was."""
        if self.failed:
            return
        path = os.path.join(self.log_dir, name)
        try:
            write(path + ".tmp")
            os.replace(path + ".tmp", path)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.remove(path + ".tmp")
            self.failed = path
            self.on_failure(path, err)

    def written(self, name: str, text: str) -> None:
        """`text` as the whole of the run folder's file `name` (see replaced)."""

        def write(path: str) -> None:
            with open(path, "w") as fh:
                fh.write(text)

        self.replaced(name, write)

    def appended(self, name: str, text: str) -> None:
        """`text` at the end of the run folder's file `name`; where that fails midway, the file is
        cut back to where it was."""
        if self.failed:
            return
        path = os.path.join(self.log_dir, name)
        size = os.path.getsize(path) if os.path.exists(path) else 0
        try:
            with open(path, "a") as fh:
                fh.write(text)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.truncate(path, size)
            self.failed = path
            self.on_failure(path, err)


class NullSink:
    """The sink of a process that does not write: each call is what EventSink does, left undone."""

    writes = False
    opened = False  # whether a writer is open, so that resume_at is too late
    next_epoch = 0  # the epoch after the last one written on the epoch axis

    def resume_at(self, epoch: int | None, step: int | None) -> None:
        """Rewrite the epoch axis from `epoch` and the step axis from `step` (None: append)."""

    def open(self) -> None:
        """Open the epoch axis's event file now, if it is not open."""

    def state_dict(self) -> dict[str, Any]:
        return {"next_epoch": self.next_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Rewrite each axis from where `state` left it: the epoch after the last one written, the
        step after the last one taken."""
        epoch = state.get("next_epoch")
        if epoch is None:  # a state saved before this key: the epoch after the last one summarised
            epoch = max((summary["epoch"] + 1 for summary in state["history"]), default=0)
        self.resume_at(epoch, state["steps"] + 1)

    def scalars(self, scalars: Mapping[str, float], step: int, per_step: bool = False) -> None:
        """{tag: number} as one event at `step`: an epoch, or an optimizer step if per_step."""

    def histograms(
        self, histograms: Mapping[str, Histogram], step: int, per_step: bool = False
    ) -> None:
        """{tag: Histogram} as one event, with the count of each tensor's non-finite values as
        `nonfinite/<tag>` where it has some; a tensor without finite values has that count alone."""

    def image(self, tag: str, image: Any, step: int) -> None:
        """A PIL image, an (H, W, 3) uint8 array or a matplotlib figure, on the epoch axis."""

    def text(self, tag: str, text: str, step: int, per_step: bool = False) -> None:
        """Markdown text (TensorBoard's Text tab) at `step`: an epoch, or an optimizer step."""

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        """The run's settings and metrics in the HParams tab, at `step` on the epoch axis."""

    def save_json(self, name: str, value: Any) -> None:
        """`value` as JSON in the file `name` of the run folder."""

    def save_image(self, name: str, image: Image.Image) -> None:
        """A PIL image as the file `name` of the run folder."""

    def append_line(self, name: str, value: Any) -> None:
        """`value` as one JSON line at the end of the file `name` of the run folder. A sink's first
        line starts the file afresh; a resumed one's keeps the lines of summaries before the step
        it resumes at (see kept_lines)."""

    def error(self, text: str) -> None:
        """Append `text` to the run folder's gradwatch-errors.log."""

    def flush(self) -> None:
        """Write what the event writers hold to disk."""

    def close(self) -> None:
        """Close the event files; safe to call twice."""


class EventSink(NullSink):
    """Writes to `log_dir`: events through tensorboardX, in one event per call (each event passes
    tensorboardX's queue on its own, which costs more than building it: README, Measured)."""

    writes = True

    def __init__(
        self, log_dir: str, flush_secs: int, purge_epoch: int | None, purge_step: int | None
    ):
        self.log_dir = log_dir
        self.flush_secs = flush_secs
        self.purge = {False: purge_epoch, True: purge_step}  # by per_step
        self.next_epoch = purge_epoch or 0
        self.writers: dict[bool, SummaryWriter] = {}
        self.appended: set[str] = set()  # the files append_line has begun
        self.stopped: str | None = None  # why no more events are written: closed, or a writer broke
        self.files = RunFiles(log_dir, self.cannot_write)
        self.records: dict[bool, SafeRecords | None] = {}  # under each writer's event file
        self.charted: set[str] = set()  # the HIDDEN_WHILE_ZERO tags that have been non-zero
        os.makedirs(log_dir, exist_ok=True)

    @property
    def opened(self) -> bool:
        return bool(self.writers)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """A copy (pickle, copy.deepcopy: a DataLoader worker's, a spawned process's) of a sink that
        has begun writing is a NullSink: its files belong to the process that writes them, and
        tensorboardX's writer cannot be copied. A sink that has written nothing is copied whole, so
        that a monitor made before torch.multiprocessing.spawn writes from the spawned process."""
        if self.writers or self.appended:
            return NullSink, ()
        return super().__reduce_ex__(protocol)

    def resume_at(self, epoch: int | None, step: int | None) -> None:
        if self.writers:
            raise RuntimeError("load_state_dict() must come before the first step() or log call")
        self.purge = {False: epoch, True: step}
        self.next_epoch = epoch or 0

    def writer(self, per_step: bool = False, step: int | None = None) -> SummaryWriter | None:
        """The writer of one axis, opened at its first use; `step`: where the write goes. None once
        no more events can be written (closed, or a writer stopped: said once, in one line)."""
        if self.stopped == "closed":
            self.stop("the monitor was closed: what is logged after close() is not written")
        if self.stopped:
            return None
        if not per_step and step is not None:
            self.next_epoch = max(self.next_epoch, step + 1)
        if per_step not in self.writers:
            folder = os.path.join(self.log_dir, "steps") if per_step else self.log_dir
            purge = self.purge[per_step]
            purge = None if purge is None else axis_step(purge, per_step)
            try:
                self.writers[per_step] = open_writer(folder, purge, self.flush_secs, not per_step)
                self.records[per_step] = guarded(self.writers[per_step])
            except OSError as err:  # a full disk, a folder made read-only
                self.cannot_write(folder, err)
                return None
        return None if self._broken(per_step) else self.writers[per_step]

    def _broken(self, per_step: bool) -> bool:
        """Whether the writer of the axis can take no more events (then said in one line)."""
        records = self.records.get(per_step)
        if records is not None and records.error is not None:
            self.cannot_write(records.path, records.error)
            return True
        why = stopped_writer(self.writers[per_step])
        if why:
            after = "Nothing more goes to TensorBoard and training goes on; free space, then "
            self.stop(f"the event writer stopped: {why}. {after}resume from the last checkpoint")
        return bool(why)

    def stop(self, why: str) -> None:
        """Write no more events, and say why in one line."""
        self.stopped = why
        print(f"gradwatch: {why}", file=sys.stderr)

    def cannot_write(self, path: str, err: OSError) -> None:
        """A file of the run folder could not be written (a full disk, a folder made read-only):
        nothing more is written there, said in one line."""
        if self.stopped not in (None, "closed"):  # said already
            return
        reason = err.strerror or str(err)
        rest = f"nothing more is written to {self.log_dir} and training goes on; free space on its "
        rest += "disk (or make it writable), then resume from the last checkpoint"
        self.stop(f"{path}: cannot be written ({reason}); {rest}")

    def open(self) -> None:
        if self.stopped or False not in self.writers:  # else open, and checked when it writes
            self.writer()

    def event(self, values: list[Summary.Value], step: int, per_step: bool = False) -> None:
        writer = self.writer(per_step, step) if values else None
        if writer is not None:
            writer.file_writer.add_summary(Summary(value=values), axis_step(step, per_step))

    def scalars(self, scalars: Mapping[str, float], step: int, per_step: bool = False) -> None:
        hidden = [tag for tag in scalars if tag.startswith(HIDDEN_WHILE_ZERO)]
        self.charted.update(tag for tag in hidden if scalars[tag] != 0)
        left_out = set(hidden) - self.charted
        shown = {tag: value for tag, value in scalars.items() if tag not in left_out}
        self.event(_scalar_values(shown), step, per_step)

    def histograms(
        self, histograms: Mapping[str, Histogram], step: int, per_step: bool = False
    ) -> None:
        nonfinite = {
            "nonfinite/" + tag: h.nonfinite for tag, h in histograms.items() if h.nonfinite
        }
        values = [_histogram_value(tag, h) for tag, h in histograms.items() if h.num]
        self.event(values + _scalar_values(nonfinite), step, per_step)

    def image(self, tag: str, image: Any, step: int) -> None:
        writer = self.writer(step=step)
        if writer is None:
            return
        if hasattr(image, "savefig"):  # a matplotlib figure
            writer.add_figure(tag, image, axis_step(step, False), close=False)
            return
        array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        writer.add_image(tag, array, axis_step(step, False), dataformats="HWC")

    def text(self, tag: str, text: str, step: int, per_step: bool = False) -> None:
        writer = self.writer(per_step, step)
        if writer is not None:
            writer.add_text(tag, text, axis_step(step, per_step))

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        # what add_hparams(name=".") writes, but into this writer's file: add_hparams opens a writer
        # of its own, whose file (named without the nanosecond suffix) can sort before this one and
        # lose its metrics to this file's purge on a resume within the same second
        writer = self.writer(step=step)
        for summary in hparams_summaries(dict(hparams), dict(metrics)) if writer else ():
            writer.file_writer.add_summary(summary, axis_step(step, False))
        self.scalars(metrics, step)

    def save_json(self, name: str, value: Any) -> None:
        # a value JSON cannot hold raises here, before anything is written
        self.files.written(name, json.dumps(value, indent=2))

    def save_image(self, name: str, image: Image.Image) -> None:
        kind = os.path.splitext(name)[1].lstrip(".").upper()
        self.files.replaced(name, lambda path: image.save(path, format=kind))

    def append_line(self, name: str, value: Any) -> None:
        if name not in self.appended:
            self.appended.add(name)
            step = self.purge[True]
            kept = kept_lines(os.path.join(self.log_dir, name), step) if step is not None else []
            self.files.written(name, "".join(kept))
        self.files.appended(name, json.dumps(value) + "\n")

    def error(self, text: str) -> None:
        self.files.appended(ERRORS, text)

    def flush(self) -> None:
        """The queued events written (tensorboardX's flush writes out only what its thread has
        taken from the queue), then the files flushed."""
        for writer in self.writers.values() if not self.stopped else ():
            drained(writer)
            writer.flush()

    def close(self) -> None:
        """Close the event files; a writer that stopped is left as it is (closing it would wait on
        its queue for ever)."""
        for writer in self.writers.values() if not self.stopped else ():
            if stopped_writer(writer) is None:
                writer.close()
        self.stopped = self.stopped or "closed"


class Guard:
    """Nothing the monitor does may end the user's run: `with guard("what it does"):` reports a
    failure once, in one line, sends its traceback to <log_dir>/gradwatch-errors.log, and goes on.
    """

    def __init__(self, sink: NullSink, log_dir: str):
        self.sink = sink
        self.path = os.path.join(log_dir, ERRORS)
        self.failed: set[str] = set()

    @contextlib.contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as err:
            if what not in self.failed:
                self.failed.add(what)
                why = f"{type(err).__name__}: {err}"
                print(
                    f"gradwatch: {what} failed ({why}); training goes on; see {self.path}",
                    file=sys.stderr,
                )
            self._keep(traceback.format_exc())

    def _keep(self, text: str) -> None:
        """The traceback into the error log; where that fails too (a full disk, a read-only folder),
        one line says so, and the guard still does not raise."""
        try:
            self.sink.error(text)
        except Exception as err:
            if ERRORS not in self.failed:
                self.failed.add(ERRORS)
                why = f"{type(err).__name__}: {err}"
                line = f"gradwatch: could not write {self.path} ({why}); tracebacks are not kept"
                print(line, file=sys.stderr)
