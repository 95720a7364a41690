"""Compression ``none``: train and measure the workload's model as it is.

When a study asks for them (an objective or constraint on ``model_size`` or ``latency``: the driver lists the
metrics it wants in ``spec.tags["wanted_metrics"]``), it reports the same model metrics as the compression
techniques (serialised size, inference latency and throughput, parameter counts), so that an uncompressed model
can be weighed against compressed ones; otherwise it spends no time on them.
"""
from __future__ import annotations

from harness import hookimpl
from harness.space import Technique
from plugins import _model_stats

TECHNIQUE = Technique(axis="compression", name="none", default=True, description="no compression")


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_declare_metrics():
    return list(_model_stats.METRICS)


@hookimpl
def harness_measure_model(model, workload, spec, device):
    wanted = set(spec.tags.get("wanted_metrics", ()))
    if wanted.intersection(m.key for m in _model_stats.METRICS):
        return _model_stats.measure(model, workload, spec, device)
    return None
