"""A finished trial in TensorBoard's HParams dashboard: its swept hyperparameters next to its results.

``tensorboard --logdir <sweep output>`` shows every trial's run directory (``trials/trial-NNNN``) as a run; its
HParams tab lists the trials with their hyperparameters and metrics. For that, once a trial's row of ``results.csv``
is read, :func:`write_trial_hparams` puts one event file into the trial's run directory (beside the
``events.out.tfevents.*`` of Lightning's TensorBoardLogger),
``events.out.tfevents.<time>.<host>.<digest>.flatlit-hparams``, holding

- the hparams plugin's three summaries (``_hparams_/experiment``: the sweep's keys with their types and domains and
  the metric tags; ``_hparams_/session_start_info``: this trial's values; ``_hparams_/session_end_info``: success);
- one scalar per metric tag that no other event file of the run holds, at the trial's last step (the dashboard reads
  a metric's value from the scalar of that tag in the run). GeneralizationTargets already logged the ``final/*``
  values there at the last step and ``flatlit measure`` the ``measures/<label>`` values at the checkpoint's step
  (for a run without them, they are written here): every tag has one value.

Hyperparameters are named by their dotted keys as in ``results.csv`` and ``flatlit analyze``; bools, numbers and
strings stay, other values become JSON text. The file changes only when its content does (the digest in its name): a
rerun of the sweep leaves it alone, a trial measured again gets a new file and the old one is removed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import socket
import struct
import time
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from flatlit.sweeps.spec import SweepSpec

SUFFIX = ".flatlit-hparams"  # the file name's end: how the file is found again and replaced


def hparam_value(value: Any) -> bool | int | float | str:
    """A hyperparameter as TensorBoard takes it: bools, numbers and strings as they are, others as JSON text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _pb_value(value: bool | int | float | str) -> struct_pb2.Value:
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, (int, float)):
        return struct_pb2.Value(number_value=value)
    return struct_pb2.Value(string_value=value)


def _data_type(values: list[Any]) -> int:
    if all(isinstance(v, bool) for v in values):
        return api_pb2.DATA_TYPE_BOOL
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return api_pb2.DATA_TYPE_FLOAT64
    if all(isinstance(v, str) for v in values):
        return api_pb2.DATA_TYPE_STRING
    return api_pb2.DATA_TYPE_UNSET  # mixed: TensorBoard shows the values as they come


def hparam_infos(spec: SweepSpec) -> list[api_pb2.HParamInfo]:
    """The swept keys with their type and domain: the grid's values or random choices, a random range."""
    infos = []
    for key in spec.keys:
        dist = spec.random_space.get(key, {})
        if key in spec.grid or "choices" in dist:
            values = [hparam_value(v) for v in (spec.grid[key] if key in spec.grid else dist["choices"])]
            kind = _data_type(values)
            info = api_pb2.HParamInfo(name=key, type=kind)
            if kind != api_pb2.DATA_TYPE_UNSET:
                info.domain_discrete.values.extend(_pb_value(v) for v in values)
        else:
            interval = api_pb2.Interval(min_value=dist["low"], max_value=dist["high"])
            info = api_pb2.HParamInfo(name=key, type=api_pb2.DATA_TYPE_FLOAT64, domain_interval=interval)
        infos.append(info)
    return infos


def logged_tags(run_dir: str, wanted: set[str]) -> set[str]:
    """The tags of ``wanted`` that the run's other event files hold (records read without their checksums)."""
    found: set[str] = set()
    for path in sorted(glob.glob(os.path.join(glob.escape(run_dir), "*tfevents*"))):
        if path.endswith(SUFFIX) or found >= wanted:
            continue
        try:
            with open(path, "rb") as f:
                while not found >= wanted:
                    header = f.read(12)
                    if len(header) < 12:
                        break
                    (length,) = struct.unpack("<Q", header[:8])
                    data = f.read(length + 4)[:length]
                    if len(data) < length:
                        break  # a file being written
                    event = event_pb2.Event.FromString(data)
                    found.update(v.tag for v in event.summary.value if v.tag in wanted)
        except (OSError, DecodeError, struct.error):
            continue
    return found


def _hparams_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary:
    value = summary_pb2.Summary.Value(
        tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR
    )
    return summary_pb2.Summary(value=[value])


def write_trial_hparams(
    spec: SweepSpec,
    params: dict[str, Any],
    run_dir: str,
    tags: list[str],
    metrics: dict[str, Any],
    step: int = 0,
    started: float | None = None,
    seconds: float | None = None,
) -> str | None:
    """Write (or keep) the trial's HParams event file; returns its path (None: no run directory).

    ``tags``: every metric tag of the sweep (the experiment lists them all, so that the dashboard shows the same
    columns whichever trial it reads the experiment from); ``metrics``: this trial's values (tag -> number; missing
    or non-finite ones are left out). ``step``: the trial's last step; ``started``/``seconds``: when the trial's last
    attempt started and how long it took (the session's start and end times).
    """
    if not os.path.isdir(run_dir):
        return None
    hparams = {k: hparam_value(params.get(k)) for k in spec.keys}
    values = {
        t: float(metrics[t])
        for t in tags
        if isinstance(metrics.get(t), (int, float)) and not isinstance(metrics[t], bool) and math.isfinite(metrics[t])
    }
    experiment = api_pb2.Experiment(
        hparam_infos=hparam_infos(spec),
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in tags],
    )
    content = json.dumps([hparams, values, step, experiment.SerializeToString().hex()], sort_keys=True)
    digest = hashlib.sha256(content.encode()).hexdigest()[:12]
    old = glob.glob(os.path.join(glob.escape(run_dir), f"*tfevents*{SUFFIX}"))
    if len(old) == 1 and old[0].endswith(f".{digest}{SUFFIX}"):
        return old[0]  # unchanged
    now = time.time()
    start = started if started is not None else now
    end = start + seconds if started is not None and seconds is not None else now
    ssi = plugin_data_pb2.SessionStartInfo(start_time_secs=start)
    for k, v in hparams.items():
        ssi.hparams[k].CopyFrom(_pb_value(v))
    sei = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=end)
    summaries = [
        (0, _hparams_summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))),
        (
            0,
            _hparams_summary(
                metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=ssi)
            ),
        ),
        (0, _hparams_summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=sei))),
    ]
    logged = logged_tags(run_dir, set(values))
    for tag, v in values.items():
        if tag not in logged:
            summaries.append((step, summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=v)])))
    name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{digest}{SUFFIX}"
    path = os.path.join(run_dir, name)
    tmp = os.path.join(run_dir, f".flatlit-hparams.{os.getpid()}.tmp")  # no "tfevents": TensorBoard skips it
    writer = RecordWriter(open(tmp, "wb"))
    try:
        writer.write(event_pb2.Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
        for s, summary in summaries:
            writer.write(event_pb2.Event(wall_time=now, step=s, summary=summary).SerializeToString())
    finally:
        writer.close()
    os.replace(tmp, path)
    for p in old:
        if p != path:
            os.remove(p)
    return path
