"""Token pruning: the registry of methods (``catalog``), the user's settings, the factory; all without torch.

The method interface (``base``) and the methods (``ptp``, ``baselines``, ``inllm``) import torch: ``make_method``
(or ``method_class``) imports a method's module when it is built.
"""

from ptp_cli.pruning.catalog import METHODS, Capabilities, method_class
from ptp_cli.pruning.settings import PRESETS, PruneConfig, make_method, plan_grid

__all__ = ["METHODS", "PRESETS", "Capabilities", "PruneConfig", "make_method", "method_class", "plan_grid"]
