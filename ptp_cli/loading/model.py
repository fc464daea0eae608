"""Loading a model: resolve a name, parse its config, read its weights and tokenizer into an eval-mode model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ptp_cli.config import ModelConfig
from ptp_cli.errors import ModelLoadError
from ptp_cli.loading.configs import load_config
from ptp_cli.loading.files import few
from ptp_cli.loading.resolve import resolve_model
from ptp_cli.loading.weights import load_state_dict
from ptp_cli.models.internvl import InternVLModel
from ptp_cli.text.tokenization import IMG_CONTEXT_TOKEN, Tokenizer, load_tokenizer


@dataclass(frozen=True)
class LoadedModel:
    path: Path  # the checkpoint directory
    cfg: ModelConfig  # its parsed config (name: what the user asked for)
    model: InternVLModel  # in eval mode, on the requested device and dtype, no gradients
    tokenizer: Tokenizer
    image_token_id: int  # id of <IMG_CONTEXT>, the placeholder the visual tokens replace


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> InternVLModel:
    """An eval-mode, gradient-free ``InternVLModel`` holding ``state``'s tensors (no copy, no random init).

    Dtype and device are those of ``state`` (e.g. ``builders.tiny.random_state_dict`` drawn directly on a GPU).
    """
    with torch.device("meta"):  # no allocation: the tensors are assigned below
        model = InternVLModel(cfg)
    model.load_weights(state)
    if leftover := [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]:
        raise RuntimeError(f"tensors left on the meta device after loading: {few(leftover)}")
    return model.eval().requires_grad_(False)


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    offline: bool | None = None,
    name: str | None = None,
) -> LoadedModel:
    """Resolve, parse and load a checkpoint (see ``resolve_model`` for what ``name_or_path`` may be;
    ``ptp_cli.zoo.load_model`` also takes the built-in names).

    ``name``: what the user asked for, kept as ``cfg.name`` for reports (default: ``name_or_path``).
    """
    path = resolve_model(str(name_or_path), offline=offline)
    cfg = load_config(path).with_name(name or str(name_or_path))
    tokenizer = load_tokenizer(path)
    image_token_id = tokenizer.token_to_id(IMG_CONTEXT_TOKEN)
    if image_token_id is None:
        raise ModelLoadError(f"the tokenizer in {path} has no {IMG_CONTEXT_TOKEN} token")
    if image_token_id >= cfg.llm.vocab_size:
        raise ModelLoadError(
            f"{IMG_CONTEXT_TOKEN} has id {image_token_id}, beyond the model's vocabulary ({cfg.llm.vocab_size})"
        )
    model = build_model(cfg, load_state_dict(path, cfg, dtype=dtype, device=device))
    return LoadedModel(path=path, cfg=cfg, model=model, tokenizer=tokenizer, image_token_id=image_token_id)

