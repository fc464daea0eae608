"""ViT outputs kept across runs over the same images: the evaluation grid runs one split under many pruning
settings, and the vision stage (most of a request's time on a small LLM) gives the same numbers every time.

Entries are keyed by the tiles' content (a hash of the pixel tensor's bytes, so the same image tiled the same
way hits whatever record or path it came from) and hold the projected tokens, the CLS embeddings and, when it
was asked for, the raw per-head CLS attention row of one ViT layer.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisionEntry:
    features: torch.Tensor  # [T, 256, D] projected visual tokens
    cls: torch.Tensor  # [T, Cv] last-layer CLS embeddings
    cls_attn: torch.Tensor | None  # [T, H, P] CLS -> patch attention at ``layer``
    layer: int | None  # the ViT layer of cls_attn (None: not computed)


class VisionCache:
    """A bounded least-recently-used map from an image's tiles to its ViT outputs."""

    def __init__(self, max_items: int = 4096) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, VisionEntry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(pixel_values: torch.Tensor) -> str:
        """Content key of a request's tiles [T, 3, H, W] (dtype and shape included)."""
        t = pixel_values.detach().contiguous().cpu()
        digest = hashlib.sha1(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        return digest.hexdigest()

    def get(self, key: str, layer: int | None) -> VisionEntry | None:
        """The entry for ``key`` if it holds what a method reading ViT ``layer`` needs (None: nothing)."""
        entry = self._items.get(key)
        if entry is None or (layer is not None and entry.layer != layer):
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: str, entry: VisionEntry) -> None:
        self._items[key] = entry
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
