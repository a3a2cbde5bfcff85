"""Rescaling graphs traced from JAX and Flax functions, and the tracer's extension API.

`trace_graph` derives the `RescalingGraph` of any function of params by
interpreting its jaxpr; `explain_graph` also gives the reason for every kernel
left out. To teach the tracer a primitive, `register_rule` a function
``rule(state, eqn, tags) -> tags`` over the tags `Scaled`, `ParamView`,
`ACTIVATION`, constants and ``None``; it records events on the `TraceState` and
raises `TraceStop` where the op does not commute with positive per-unit scaling.
"""

from enorm_jax.tracing._core import (ACTIVATION, ParamView, Scaled, TraceState, TraceStop,
                                     register_rule)
from enorm_jax.tracing._trace import TraceReport, explain_graph, trace_graph

__all__ = ["ACTIVATION", "ParamView", "Scaled", "TraceReport", "TraceState", "TraceStop",
           "explain_graph", "register_rule", "trace_graph"]
