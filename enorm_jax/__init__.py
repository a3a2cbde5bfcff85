"""enorm_jax: Equi-normalization (ENorm) for JAX, Flax and optax."""

from enorm_jax.balance import (
    FIRST_MOMENT,
    PARAM_COPY,
    SECOND_MOMENT,
    balance,
    energy,
    rescale,
)
from enorm_jax.baselines import (
    implicit_energy,
    init_log_scales,
    path_norm_scaling,
    path_sgd,
    scale_by_path_norm,
)
from enorm_jax.check import CheckReport, check_graph
from enorm_jax.chain import chain_graph
from enorm_jax.graph import Entry, Group, RescalingGraph
from enorm_jax.trace import TraceReport, explain_graph, trace_graph
from enorm_jax.trace_core import ParamView, Scaled, Tracer, TraceStop, register_rule
from enorm_jax.transform import (
    DEFAULT_STATE_ROLES,
    EnormState,
    enorm,
    rescale_optimizer_state,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_STATE_ROLES",
    "FIRST_MOMENT",
    "PARAM_COPY",
    "SECOND_MOMENT",
    "CheckReport",
    "EnormState",
    "Entry",
    "Group",
    "RescalingGraph",
    "ParamView",
    "Scaled",
    "TraceReport",
    "TraceStop",
    "Tracer",
    "balance",
    "chain_graph",
    "check_graph",
    "energy",
    "explain_graph",
    "enorm",
    "implicit_energy",
    "init_log_scales",
    "path_norm_scaling",
    "path_sgd",
    "register_rule",
    "rescale",
    "rescale_optimizer_state",
    "scale_by_path_norm",
    "trace_graph",
]
