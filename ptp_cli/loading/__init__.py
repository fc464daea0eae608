"""Loading checkpoints: find one (``resolve``), read its config (``configs``), convert its weights
(``weights``), and build the model (``model``). Writing checkpoints lives in ``ptp_cli.builders``, which this
package never imports; built-in names (``tiny``) are ``ptp_cli.zoo``'s."""

from ptp_cli.loading.configs import load_config
from ptp_cli.loading.files import Layout
from ptp_cli.loading.model import LoadedModel, build_model, load_model
from ptp_cli.loading.resolve import resolve_model
from ptp_cli.loading.weights import canonical_shapes, load_state_dict

__all__ = [
    "Layout",
    "LoadedModel",
    "build_model",
    "canonical_shapes",
    "load_config",
    "load_model",
    "load_state_dict",
    "resolve_model",
]
