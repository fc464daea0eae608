"""The vision stage with pruning inside the ViT (stage 1 of ``--vit-prune``): the engine's ``encode_images`` when
the method asks for it.

1. Every tile runs ViT layers 0..L (L = the method's ``vit_prune_layer``) whole; layer L gives the CLS -> patch
   attention (when the method reads it) and the CLS embeddings stage 1 ranks regions by.
2. The method keeps, per sample, a set of tokens (``vit_select``). A token is the 2x2 block of patches that pixel
   shuffle merges into it, so a tile's kept sequence is its CLS plus the 4 patches of each kept block.
3. Layers L+1.. run on the kept sequences only. Tiles keep different counts, so a chunk of tiles is sorted by
   length and cut into groups whose padding stays small; each group is right-padded to its longest tile and the
   padding is hidden from attention by a key mask (exact: a padded key gets zero weight, padded queries are
   dropped), so no tile sees another's patches and no tile is run alone.
4. Each kept block's 4 patches are concatenated in pixel shuffle's channel order and projected (``mlp1``);
   the features of dropped tokens are zero and never reach the LLM (they are not in ``available``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ptp_cli.models.internvl import InternVLModel, pixel_shuffle
from ptp_cli.pruning.base import PruningMethod, VisualContext
from ptp_cli.pruning.scores import vit_token_scores
from ptp_cli.run.vision_cache import VisionEntry

if TYPE_CHECKING:
    from ptp_cli.run.engine import Request

PAD_SLACK = 1.25  # a group's padded size may exceed its real size by this factor before a new group starts


def block_patches(grid: int, *, factor: int = 2, version: str = "v2") -> torch.Tensor:
    """[tokens, factor^2]: the patch indices (row-major in the grid x grid patches, CLS excluded) that pixel
    shuffle puts into each token, in the order of the token's channel groups. Derived by shuffling the patch
    indices themselves, so it matches ``pixel_shuffle`` for every version by construction."""
    idx = torch.arange(grid * grid).view(1, grid, grid, 1)  # one "channel": the patch's own index
    return pixel_shuffle(idx, factor=factor, version=version).reshape(-1, factor * factor)


def length_groups(lengths: list[int], *, slack: float = PAD_SLACK) -> list[list[int]]:
    """Indices of tiles grouped for padded batches: longest first, a group grows while its padded size (count x
    its longest) stays within ``slack`` times its real size."""
    order = sorted(range(len(lengths)), key=lambda t: -lengths[t])
    groups: list[list[int]] = []
    for t in order:
        g = groups[-1] if groups else None
        if g is not None and lengths[g[0]] * (len(g) + 1) <= slack * (sum(lengths[u] for u in g) + lengths[t]):
            g.append(t)
        else:
            groups.append([t])
    return groups


@torch.inference_mode()
def encode_pruned(
    model: InternVLModel, requests: Sequence[Request], method: PruningMethod, *, vit_batch: int
) -> tuple[list[VisionEntry], list[torch.Tensor]]:
    """Stage 1 over a batch: per sample, the ViT outputs (features [T, 256, D], zero for dropped tokens; the last
    layer's CLS; layer L's CLS attention row when the method reads it) and the kept token indices [K1]."""
    cfg, vit = model.cfg, model.vision_model
    layer = method.vit_prune_layer()
    assert layer is not None
    score_layer = method.vit_score_layer()
    select = cfg.select_layer % cfg.vision.num_layers
    pix = torch.cat([r.pixel_values for r in requests]).to(model.device, model.dtype)
    hidden, rows, early = [], [], []
    for chunk in pix.split(vit_batch):  # layers 0..L on every patch
        x, sel, row = vit.run_layers(vit.embeddings(chunk), end=layer + 1, select_layer=select,
                                     cls_attn_layer=score_layer)
        hidden.append(x)  # [t, 1 + P, C]
        rows.append(row)
        early.append(sel)  # the features' layer, when it is not after L
    h = torch.cat(hidden)  # [T_all, 1 + P, C]
    source = torch.cat(early) if select <= layer else None
    splits = [r.num_tiles for r in requests]
    attn = list(torch.cat(rows).split(splits)) if score_layer is not None else [None] * len(requests)
    ctx = VisualContext(
        tiles=splits, has_thumbnail=[r.has_thumbnail and r.num_tiles > 1 for r in requests],
        tokens_per_tile=cfg.tokens_per_tile, cls=list(h[:, 0].split(splits)),
        token_scores=[vit_token_scores(a, head_agg=method.head_aggregation(), model_cfg=cfg) for a in attn]
        if score_layer is not None else None, instruction_scores=None, seeds=[r.seed for r in requests],
    )
    available = [k.to(torch.long).cpu() for k in method.vit_select(ctx)]
    per = cfg.tokens_per_tile
    kept = [k[(k >= t * per) & (k < (t + 1) * per)] - t * per for k, n in zip(available, splits, strict=True)
            for t in range(n)]  # per tile (all tiles of the batch in order), local token indices
    blocks = block_patches(cfg.vision.grid, factor=cfg.shuffle_factor, version=cfg.ps_version).to(h.device)
    d = cfg.llm.hidden_size
    features = h.new_zeros(h.shape[0], per, d)  # [T_all, 256, D]
    cls = h.new_zeros(h.shape[0], h.shape[-1])  # [T_all, C]
    lengths = [1 + blocks.shape[1] * k.numel() for k in kept]
    for group in length_groups(lengths):
        for part in range(0, len(group), vit_batch):
            _run_rest(model, h, source, blocks, kept, group[part : part + vit_batch], lengths, layer=layer,
                      select=select, features=features, cls=cls)
    entries = [VisionEntry(features=f, cls=c, cls_attn=a, layer=score_layer)
               for f, c, a in zip(features.split(splits), cls.split(splits), attn, strict=True)]
    return entries, available


def _run_rest(
    model: InternVLModel, h: torch.Tensor, source: torch.Tensor | None, blocks: torch.Tensor,
    kept: list[torch.Tensor], tiles: list[int], lengths: list[int], *, layer: int, select: int,
    features: torch.Tensor, cls: torch.Tensor,
) -> None:
    """Layers L+1.. for some tiles, padded to the longest; writes their features and CLS in place."""
    dev, width = h.device, max(lengths[t] for t in tiles)
    slots = torch.zeros(len(tiles), width, dtype=torch.long, device=dev)  # [t, S] position in the 1 + P sequence
    real = torch.zeros(len(tiles), width, dtype=torch.bool, device=dev)  # [t, S] not padding
    for j, t in enumerate(tiles):
        patches = blocks[kept[t].to(dev)].flatten()  # [4k], block by block in channel order
        slots[j, 1 : 1 + patches.numel()] = patches + 1  # slot 0 stays CLS; +1 skips it
        real[j, : lengths[t]] = True
    rows = torch.tensor(tiles, device=dev)[:, None]
    x = h[rows, slots]  # [t, S, C]
    mask = None if bool(real.all()) else real  # equal lengths: no mask, SDPA's fastest path
    x, sel, _ = model.vision_model.run_layers(x, start=layer + 1, select_layer=select, key_mask=mask)
    chosen = sel if select > layer else source[rows, slots]  # [t, S, C] the features' layer
    f, counts = blocks.shape[1], [kept[t].numel() for t in tiles]
    merged = torch.cat([chosen[j, 1 : 1 + f * k].reshape(k, -1) for j, k in enumerate(counts)])  # [sum k, 4C]
    projected = model.mlp1(merged).split(counts)  # one projector call for the group: [k, D] per tile
    for t, p in zip(tiles, projected, strict=True):
        features[t, kept[t].to(dev)] = p.to(features.dtype)
    cls[tiles] = x[:, 0].to(cls.dtype)
