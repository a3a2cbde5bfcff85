"""enorm_jax: Equi-normalization (ENorm) for JAX, Flax and optax.

* `balance`, `energy`, `rescale`: exact ENorm on a params pytree, jit-able.
* `enorm`: the optax wrapper that balances after every optimizer step.
* `RescalingGraph`, `Group`, `Entry`: the rescaling symmetry of a network;
  `chain_graph` builds a chain's, `trace_graph` traces any function's and
  `check_graph` proves one numerically.
* `enorm_jax.models`: the paper's networks; `enorm_jax.contrib`: Path-SGD and
  implicit ENorm; `enorm_jax.tracing`: the tracer's extension API.
"""

from enorm_jax import contrib, tracing
from enorm_jax.balance import FIRST_MOMENT, PARAM_COPY, SECOND_MOMENT, balance, energy, rescale
from enorm_jax.chain import chain_graph
from enorm_jax.check import CheckReport, check_graph
from enorm_jax.graph import Entry, Group, RescalingGraph, leaves_by_path
from enorm_jax.optimizer_state import DEFAULT_STATE_ROLES, rescale_optimizer_state
from enorm_jax.tracing import TraceReport, explain_graph, register_rule, trace_graph
from enorm_jax.transform import EnormState, enorm, raise_if_misapplied

__version__ = "0.2.0"

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
    "TraceReport",
    "balance",
    "chain_graph",
    "check_graph",
    "contrib",
    "energy",
    "enorm",
    "explain_graph",
    "leaves_by_path",
    "raise_if_misapplied",
    "register_rule",
    "rescale",
    "rescale_optimizer_state",
    "trace_graph",
    "tracing",
]
