"""Making checkpoints rather than reading them: the writers of both layouts (``writers``), the built-in tiny
model and random weights of any shape (``tiny``), and the tiny model's BPE tokenizer (``bpe``).

Nothing on the library's loading path (``ptp_cli.loading``, ``ptp_cli.run.pipeline``) imports this package;
``ptp_cli.zoo`` connects built-in names to it.
"""

from ptp_cli.builders.bpe import build_tiny_tokenizer
from ptp_cli.builders.tiny import (
    TINY,
    TINY_VERSION,
    build_random_checkpoint,
    ensure_tiny,
    ptp_home,
    random_state_dict,
    tiny_config,
)
from ptp_cli.builders.writers import save_hf_layout, save_original_layout

__all__ = [
    "TINY",
    "TINY_VERSION",
    "build_random_checkpoint",
    "build_tiny_tokenizer",
    "ensure_tiny",
    "ptp_home",
    "random_state_dict",
    "save_hf_layout",
    "save_original_layout",
    "tiny_config",
]
