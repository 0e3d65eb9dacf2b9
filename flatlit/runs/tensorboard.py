"""Post-hoc results in the run's own TensorBoard: what ``flatlit measure``, ``robustness`` and ``landscape`` add.

Training writes its scalars through Lightning's TensorBoardLogger into the run directory (``RUN/events.out.tfevents.*``
beside ``RUN/checkpoints``). The evaluations of a checkpoint run later, so they add their own event file to that
directory, one per command, named ``events.out.tfevents.<time>.<host>.<pid>.<n>.flatlit-<command>``: TensorBoard
reads every event file of a directory as one run, so the post-hoc values appear beside the training curves.

**Re-running never duplicates a point.** Each call reads that command's previous post-hoc file(s) of the directory,
keeps the values this call does not rewrite, writes them together with everything the call's results hold (cached and
newly computed values alike) to a fresh file, then deletes the old one(s). What "rewrites" means is the command's
``replace`` rule: ``"step"`` (measure, robustness) replaces a tag's value at the same step only, so the measures of two
checkpoints of a run (at their global steps) both stay; ``"tag"`` (landscape, whose steps index the points of a curve)
replaces every value of a tag, so a rerun with fewer points leaves no stale tail. A TensorBoard already running keeps
what it has read in memory until it reloads the run (restart it to see a replaced value once only).

**No TensorBoard.** A run "has a TensorBoard directory" when its run directory holds at least one event file written
by training (not one of the ``.flatlit-*`` files). Otherwise (a CSVLogger run, no logger, a checkpoint outside a run)
nothing is written and one line on stderr says so: ``flatlit measure: no TensorBoard event files in RUN (the run had
no TensorBoardLogger); wrote measures.json only.``

Scalars are written as float32 ``simple_value`` (what ``SummaryWriter.add_scalar`` writes): values round to float32,
and non-finite values (a vacuous bound's ``inf``, a ``nan``) are written as they are, which TensorBoard shows as gaps
or at the chart's edge. Images are PNGs, written without re-encoding.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import time
from typing import Any

from flatlit.runs.load import run_dir

EVENTS_PREFIX = "events.out.tfevents."
OURS = ".flatlit-"  # every post-hoc event file's suffix starts with this


def suffix(command: str) -> str:
    """The event-file suffix of ``command``'s post-hoc values (``.flatlit-measure``)."""
    return f"{OURS}{command}"


def _event_files(folder: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(folder) if n.startswith(EVENTS_PREFIX))
    except OSError:
        return []


def tensorboard_dir(ckpt_path: str) -> str | None:
    """The run directory of ``ckpt_path`` when training wrote TensorBoard event files there, else None."""
    folder = run_dir(ckpt_path)
    return folder if any(OURS not in n for n in _event_files(folder)) else None


def checkpoint_step(ckpt_path: str, trust: bool = False) -> int:
    """The checkpoint's ``global_step`` (0 when it records none), read by flatlit's safe loader."""
    from flatlit.utils.safe_loading import load_checkpoint

    ckpt = load_checkpoint(ckpt_path, trust=trust)
    step = ckpt.get("global_step", 0) if isinstance(ckpt, dict) else 0
    return int(step) if isinstance(step, int) else 0


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure of :mod:`flatlit.figures` as PNG bytes (its size × DPI pixels, as the report saves it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from flatlit.figures.style import save

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    save(fig, buf)
    return buf.getvalue()


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 24:
        raise ValueError("not a PNG")
    return struct.unpack(">II", png[16:24])


class PosthocBoard:
    """The post-hoc values of one call of ``flatlit <command>`` on ``ckpt_path``: add them, then :meth:`write`.

    ``available`` is False when the run has no TensorBoard directory (then the ``add_*`` calls are no-ops and
    :meth:`write` prints the one line). ``step`` is the checkpoint's global step, read on first use.
    """

    def __init__(self, command: str, ckpt_path: str, trust: bool = False, replace: str = "step") -> None:
        if replace not in ("step", "tag"):
            raise ValueError(f"replace: 'step' or 'tag', got {replace!r}")
        self.command, self.ckpt_path, self.trust, self.replace = command, ckpt_path, trust, replace
        self.folder = tensorboard_dir(ckpt_path)
        self._step: int | None = None
        self._events: list[Any] = []

    @property
    def available(self) -> bool:
        return self.folder is not None

    @property
    def step(self) -> int:
        if self._step is None:
            self._step = checkpoint_step(self.ckpt_path, self.trust)
        return self._step

    def _add(self, tag: str, step: int | None, **value: Any) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        if not self.available:
            return
        step = self.step if step is None else int(step)
        summary = Summary(value=[Summary.Value(tag=tag, **value)])
        self._events.append(Event(wall_time=time.time(), step=step, summary=summary))

    def scalar(self, tag: str, value: float, step: int | None = None) -> None:
        """``value`` (float32; inf/nan as they are) under ``tag`` at ``step`` (default: the checkpoint's)."""
        self._add(tag, step, simple_value=float(value))

    def png(self, tag: str, png: bytes, step: int | None = None) -> None:
        """A PNG image under ``tag`` at ``step`` (default: the checkpoint's)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        width, height = _png_size(png)
        image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
        self._add(tag, step, image=image)

    def figure(self, tag: str, fig: Any, step: int | None = None) -> None:
        """A matplotlib figure, as a PNG image under ``tag``."""
        if self.available:
            self.png(tag, figure_png(fig), step)

    def write(self, wrote: str) -> str | None:
        """Write the event file (the previous post-hoc values that this call does not replace, then this call's),
        delete the previous file(s) of the command; returns the new file's path. Without a TensorBoard directory,
        print one line saying that only ``wrote`` was written and return None."""
        if not self.available:
            sys.stderr.write(
                f"flatlit {self.command}: no TensorBoard event files in {run_dir(self.ckpt_path)} (the run had no "
                f"TensorBoardLogger); wrote {wrote} only.\n"
            )
            return None
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        end = suffix(self.command)
        old = [os.path.join(self.folder, n) for n in _event_files(self.folder) if n.endswith(end)]
        new_keys = {(v.tag, e.step) for e in self._events for v in e.summary.value}
        new_tags = {tag for tag, _ in new_keys}
        kept: dict[tuple[str, int], Any] = {}  # one value per (tag, step): a later file's wins
        for path in old:  # several only after a call killed between writing and deleting
            kept.update(((e.summary.value[0].tag, e.step), e) for e in self._previous(path, new_tags, new_keys))
        events = sorted([*kept.values(), *self._events], key=lambda e: e.step)  # stable: a tag's values in step order
        writer = EventFileWriter(self.folder, filename_suffix=end)
        try:
            for event in events:
                writer.add_event(event)
            writer.flush()
        finally:
            writer.close()
        new = [os.path.join(self.folder, n) for n in _event_files(self.folder) if n.endswith(end)]
        new = [p for p in new if p not in old]
        for previous in old:  # only once the new file is complete: a killed call leaves the old one
            try:
                os.remove(previous)
            except OSError:
                pass
        return new[-1] if new else None

    def _previous(self, path: str, new_tags: set[str], new_keys: set[tuple[str, int]]) -> list[Any]:
        """The summary values of a previous post-hoc file, one event each, less those this call replaces."""
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
        from tensorboard.compat.proto.event_pb2 import Event

        out, records = [], []
        try:
            records.extend(RawEventFileLoader(path).Load())
        except Exception:  # a damaged file of ours: the values before the damage are kept, the file replaced
            pass
        for raw in records:
            try:
                event = Event.FromString(raw)
            except Exception:  # a record that is not an event (damage): dropped
                continue
            if not event.HasField("summary"):
                continue  # the file_version header: the new file writes its own
            for value in event.summary.value:
                if (value.tag in new_tags) if self.replace == "tag" else ((value.tag, event.step) in new_keys):
                    continue
                one = Event(wall_time=event.wall_time, step=event.step)
                one.summary.value.append(value)
                out.append(one)
        return out
