"""The paper's other methods, kept beside ENorm for comparisons.

* Path-SGD (Neyshabur et al. 2015): `path_sgd`, `scale_by_path_norm`,
  `path_norm_scaling`.
* Implicit ENorm (ENorm-Impl, the paper's Appendix C): `implicit_energy`,
  `init_log_scales`.
"""

from enorm_jax.contrib._baselines import (implicit_energy, init_log_scales, path_norm_scaling,
                                          path_sgd, scale_by_path_norm)

__all__ = ["implicit_energy", "init_log_scales", "path_norm_scaling", "path_sgd",
           "scale_by_path_norm"]
