"""enorm_jax: Equi-normalization (ENorm) for JAX, Flax and optax."""

from enorm_jax.balance import balance
from enorm_jax.balance import energy
from enorm_jax.balance import rescale
from enorm_jax.balance import rescale_gradients
from enorm_jax.balance import rescale_second_moments
from enorm_jax.baselines import implicit_energy
from enorm_jax.baselines import init_log_scales
from enorm_jax.baselines import path_norm_scaling
from enorm_jax.baselines import path_sgd
from enorm_jax.baselines import scale_by_path_norm
from enorm_jax.check import CheckReport
from enorm_jax.check import check_graph
from enorm_jax.graph import Entry
from enorm_jax.graph import Group
from enorm_jax.graph import RescalingGraph
from enorm_jax.graph import chain_graph
from enorm_jax.trace import RULES as TRACE_RULES
from enorm_jax.trace import TraceReport
from enorm_jax.trace import register_rule
from enorm_jax.trace import trace_graph
from enorm_jax.transform import DEFAULT_STATE_ROLES
from enorm_jax.transform import FIRST_MOMENT
from enorm_jax.transform import PARAM_COPY
from enorm_jax.transform import SECOND_MOMENT
from enorm_jax.transform import EnormState
from enorm_jax.transform import enorm
from enorm_jax.transform import rescale_optimizer_state

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_STATE_ROLES",
    "FIRST_MOMENT",
    "PARAM_COPY",
    "SECOND_MOMENT",
    "TRACE_RULES",
    "TraceReport",
    "register_rule",
    "trace_graph",
    "EnormState",
    "enorm",
    "rescale_optimizer_state",
    "Entry",
    "Group",
    "RescalingGraph",
    "CheckReport",
    "balance",
    "check_graph",
    "implicit_energy",
    "init_log_scales",
    "path_norm_scaling",
    "path_sgd",
    "scale_by_path_norm",
    "chain_graph",
    "energy",
    "rescale",
    "rescale_gradients",
    "rescale_second_moments",
]
