"""The batched InternVL engine: ViT -> (pruning) -> LLM prefill -> decoding, on tensors and token ids.

The engine knows nothing about tokenization, images on disk or prompt text: a ``Request`` carries
prompt token ids with one placeholder id per visual token, the tiles' pixel values, and the spans
the pruning methods need. ``Engine.generate`` runs one batch (any mix of tile counts) and returns one
``Result`` per request, in order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ptp_cli import flops as F
from ptp_cli.models.internvl import InternVLModel
from ptp_cli.models.llm import LayerCache
from ptp_cli.pruning.base import LayerState, NoPruning, PruningMethod, VisualContext
from ptp_cli.pruning.scores import instruction_scores, vit_token_scores


@dataclass
class Request:
    """One sample, already tokenised and tiled."""

    ids: list[int]  # prompt token ids, with num_image_tokens placeholder ids from image_start on
    pixel_values: torch.Tensor  # [T, 3, 448, 448]
    image_start: int  # index in ids of the first visual placeholder
    instruction: tuple[int, int]  # [start, end) of the question's tokens in ids
    stop_ids: Sequence[int] = ()  # generation ends at any of these (not included in the output)
    max_new_tokens: int = 64  # most tokens to generate
    temperature: float = 0.0  # 0: greedy
    seed: int = 0  # sampling (and random pruning) seed
    has_thumbnail: bool = True  # the last tile is a thumbnail (set False for a single-tile image)
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])


@dataclass
class Result:
    tokens: list[int]  # generated ids, the stop token excluded
    logprobs: list[float]  # log-probability of each generated token under the model (temperature 1)
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int  # tokens the LLM's first layer saw (pruned prompt)
    visual_before: int  # visual tokens from the ViT
    visual_after: int  # visual tokens entering the LLM
    visual_after_per_tile: list[int]  # kept per tile
    kept: list[int]  # kept visual token indices in [0, visual_before) (tile t, token i -> 256*t + i)
    layer_lengths: list[int]  # tokens each LLM layer processed in prefill (in-LLM methods shorten later ones)
    flops: dict[str, int]  # per stage, 2 FLOPs per multiply-add
    timing: dict[str, float] = field(default_factory=dict)  # seconds per stage of the batch this ran in
    batch_size: int = 1  # requests in that batch


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Stage wall times; synchronises the device before each reading so GPU work is attributed correctly."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}
        sync_device(device)
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        sync_device(self.device)
        now = time.perf_counter()
        self.times[stage] = self.times.get(stage, 0.0) + now - self.t
        self.t = now


def _right_pad(rows: list[torch.Tensor], length: int, value) -> torch.Tensor:
    """Stack 1-D (or [S, D]) tensors right-padded to ``length``.

    Right padding keeps prefill exactly causal for every real token (padding comes after it), so attention
    needs no mask there and SDPA can use its fastest kernels.
    """
    out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), value)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


class Engine:
    def __init__(
        self,
        model: InternVLModel,
        *,
        image_token_id: int,
        method: PruningMethod | None = None,
        vit_batch: int = 64,
    ) -> None:
        self.model = model
        self.image_token_id = image_token_id
        self.method = method or NoPruning()
        self.vit_batch = vit_batch  # tiles per ViT call: bounds activation memory
        self.cfg = model.cfg

    # ------------------------------------------------------------------------------------------ stages

    @torch.inference_mode()
    def encode_images(self, requests: Sequence[Request]):
        """ViT + projector over every tile of the batch, in chunks. Returns concatenated outputs."""
        m = self.method
        pix = torch.cat([r.pixel_values for r in requests]).to(self.model.device, self.model.dtype)
        feats, cls, scores = [], [], []
        for chunk in pix.split(self.vit_batch):
            out = self.model.vision_features(chunk, cls_attn_layer=m.vit_score_layer())
            feats.append(out.features)
            cls.append(out.cls)
            if out.cls_attn is not None:
                scores.append(vit_token_scores(out.cls_attn, head_agg=m.head_aggregation(), model_cfg=self.cfg))
        return torch.cat(feats), torch.cat(cls), (torch.cat(scores) if scores else None)

    def _embed(self, ids: list[torch.Tensor], visual: list[torch.Tensor], starts: list[int]) -> list[torch.Tensor]:
        """Token embeddings with visual features written over the placeholders."""
        emb = self.model.language_model.tok_embeddings
        out = []
        for row, v, s in zip(ids, visual, starts, strict=True):
            e = emb(row)  # [S, D]
            e[s : s + v.shape[0]] = v.to(e.dtype)
            out.append(e)
        return out

    @torch.inference_mode()
    def probe(self, requests: Sequence[Request], visual: list[torch.Tensor]) -> list[torch.Tensor]:
        """Instruction scores of every visual token, from LLM layer M on the unpruned sequences."""
        m = self.method
        layer = m.probe_layer()
        assert layer is not None
        dev = self.model.device
        ids = [torch.tensor(r.ids, device=dev) for r in requests]
        x = _right_pad(self._embed(ids, visual, [r.image_start for r in requests]), max(len(i) for i in ids), 0.0)
        b, s = x.shape[:2]
        valid = _right_pad([torch.ones(len(i), dtype=torch.bool, device=dev) for i in ids], s, False)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        instr = torch.zeros(b, s, dtype=torch.bool, device=dev)
        for i, r in enumerate(requests):
            instr[i, r.instruction[0] : r.instruction[1]] = True
        scores = instruction_scores(
            self.model.language_model, x, positions, valid, instr,
            layer=layer, head_agg=m.head_aggregation(), instr_agg=m.instruction_aggregation(),
        )  # [B, S]
        out = []
        for i, r in enumerate(requests):
            out.append(scores[i, r.image_start : r.image_start + visual[i].shape[0]])
        return out

    # ------------------------------------------------------------------------------------------ generate

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request]) -> list[Result]:
        if not requests:
            return []
        lm, dev = self.model.language_model, self.model.device
        ntok = self.cfg.tokens_per_tile
        for r in requests:
            n = r.num_tiles * ntok
            placeholders = sum(1 for t in r.ids[r.image_start : r.image_start + n] if t == self.image_token_id)
            if placeholders != n:
                raise ValueError(f"request has {placeholders} image placeholders at image_start, expected {n}")
        clock = _Clock(dev)

        # ViT and projector over all tiles of the batch.
        feats, cls, tscores = self.encode_images(requests)
        splits = [r.num_tiles for r in requests]
        visual = [f.flatten(0, 1) for f in feats.split(splits)]  # per sample [T_i*256, D]
        clock.lap("vit")

        # Pre-LLM selection (PTP and the pre-LLM baselines).
        m = self.method
        instr_scores = self.probe(requests, visual) if m.probe_layer() is not None else None
        ctx = VisualContext(
            tiles=splits,
            has_thumbnail=[r.has_thumbnail and r.num_tiles > 1 for r in requests],
            tokens_per_tile=ntok,
            cls=list(cls.split(splits)),
            token_scores=list(tscores.split(splits)) if tscores is not None else None,
            instruction_scores=instr_scores,
            seeds=[r.seed for r in requests],
        )
        keep = m.select(ctx)
        clock.lap("probe")

        # Pruned prompts: drop the placeholders (and features) of discarded visual tokens.
        ids, vis, spans, kept_all = [], [], [], []
        for r, v, k in zip(requests, visual, keep, strict=True):
            n = v.shape[0]
            k = torch.arange(n, device=dev) if k is None else k.to(dev)
            row = torch.tensor(r.ids, device=dev)
            ids.append(torch.cat([row[: r.image_start], row[r.image_start + k], row[r.image_start + n :]]))
            vis.append(v[k])
            kept_all.append(k)
            dropped = n - k.numel()
            spans.append((r.image_start, r.image_start + k.numel(), r.instruction[0] - dropped,
                          r.instruction[1] - dropped))
        b, s = len(requests), max(len(i) for i in ids)
        x = _right_pad(self._embed(ids, vis, [r.image_start for r in requests]), s, 0.0)  # [B, S, D]
        valid = _right_pad([torch.ones(len(i), dtype=torch.bool, device=dev) for i in ids], s, False)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # contiguous positions per sample
        visual_mask = torch.zeros(b, s, dtype=torch.bool, device=dev)
        instr_mask = torch.zeros_like(visual_mask)
        for i, (v0, v1, q0, q1) in enumerate(spans):
            visual_mask[i, v0:v1] = True
            instr_mask[i, q0:q1] = True

        # Prefill, layer by layer; in-LLM methods may drop tokens between layers.
        max_new = max(r.max_new_tokens for r in requests)
        lm.rotary.prepare(int(positions.max()) + 1 + max_new)
        drops = m.drop_layers()
        caches: list[LayerCache] = []
        layer_tokens = []  # per layer, real tokens of each sample [B] (kept on device: no sync per layer)
        cos, sin = lm.rotary(positions, x.dtype)
        for j, layer in enumerate(lm.layers):
            cache = lm.new_cache(b, x.shape[1] + max_new)
            caches.append(cache)
            layer_tokens.append(valid.sum(-1))
            out = layer(x, cos, sin, cache, valid, causal=True)  # right-padded: causal is exact
            x = out.hidden
            if j in drops and j + 1 < len(lm.layers):
                state = LayerState(
                    layer=j, hidden=x, q=out.q, keys=out.keys, valid=valid, visual=visual_mask,
                    instruction=instr_mask, last=valid.sum(-1) - 1,
                )
                mask = m.after_layer(state)
                if mask is not None:
                    x, valid, positions, visual_mask, instr_mask = self._compact(
                        mask & valid, x, valid, positions, visual_mask, instr_mask
                    )
                    cos, sin = lm.rotary(positions, x.dtype)
        last = valid.sum(-1) - 1  # [B] each row's last real token
        rows = torch.arange(b, device=dev)
        logits = lm.logits(x[rows, last])  # [B, V]
        clock.lap("prefill")

        # Decode: one token per step for the whole batch; each layer attends to what it kept.
        next_pos = positions[rows, last] + 1  # [B]
        gens = [torch.Generator(device=dev).manual_seed(r.seed) for r in requests]
        temps = [r.temperature for r in requests]
        stop = torch.zeros(b, max(1, max(len(r.stop_ids) for r in requests)), dtype=torch.long, device=dev) - 1
        for i, r in enumerate(requests):
            if not r.ignore_eos and r.stop_ids:
                stop[i, : len(r.stop_ids)] = torch.tensor(list(r.stop_ids), device=dev)
        limits = torch.tensor([r.max_new_tokens for r in requests], device=dev)
        done = limits <= 0
        tokens, logps = [], []
        ones = torch.ones(b, 1, dtype=torch.bool, device=dev)
        steps = 0
        while True:
            tok = self._pick(logits, temps, gens)  # [B]
            logp = torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]
            tokens.append(tok)
            logps.append(logp)
            steps += 1
            done = done | (tok[:, None] == stop).any(-1) | (steps >= limits)
            # Reading `done` syncs with the device: do it every few steps (extra tokens are cut off later).
            if steps >= max_new or (steps % 4 == 0 and bool(done.all())):
                break
            h = lm.tok_embeddings(tok)[:, None]  # [B, 1, D]
            cos, sin = lm.rotary(next_pos[:, None], h.dtype)
            for layer, cache in zip(lm.layers, caches, strict=True):
                h = layer(h, cos, sin, cache, ones).hidden
            logits = lm.logits(h[:, -1])
            next_pos = next_pos + 1
        clock.lap("decode")

        return self._results(requests, tokens, logps, kept_all, ids, torch.stack(layer_tokens, 1).cpu(), clock.times)

    # ------------------------------------------------------------------------------------------ helpers

    @staticmethod
    def _pick(logits: torch.Tensor, temps: list[float], gens: list[torch.Generator]) -> torch.Tensor:
        """Greedy where temperature is 0; otherwise a seeded sample per request (its own generator)."""
        tok = logits.argmax(-1)
        for i, t in enumerate(temps):
            if t <= 0:
                continue
            probs = torch.softmax(logits[i] / t, -1)
            tok[i] = torch.multinomial(probs, 1, generator=gens[i])[0]
        return tok

    @staticmethod
    def _compact(keep: torch.Tensor, *tensors: torch.Tensor):
        """Gather each row's kept positions into a shorter right-padded batch. keep: [B, S]."""
        b, s = keep.shape
        width = int(keep.sum(-1).max())
        dest = keep.long().cumsum(-1) - 1  # [B, S] destination slot of every kept token, in original order
        rows = torch.arange(b, device=keep.device)[:, None].expand(b, s)
        out = []
        for t in tensors:
            o = t.new_zeros((b, width, *t.shape[2:]))
            o[rows[keep], dest[keep]] = t[keep]
            out.append(o)
        return out

    def _results(self, requests, tokens, logps, kept_all, ids, layer_tokens, times) -> list[Result]:
        tok = torch.stack(tokens, 1).tolist()  # [B, steps]
        lp = torch.stack(logps, 1).tolist()
        ntok = self.cfg.tokens_per_tile
        results = []
        for i, r in enumerate(requests):
            stop = set() if r.ignore_eos else set(r.stop_ids)
            out, outp, reason = [], [], "length"
            for t, p in zip(tok[i][: r.max_new_tokens], lp[i][: r.max_new_tokens], strict=True):
                if t in stop:
                    reason = "stop"
                    break
                out.append(t)
                outp.append(p)
            kept = kept_all[i].tolist()
            per_tile = [0] * r.num_tiles
            for k in kept:
                per_tile[k // ntok] += 1
            lengths = layer_tokens[i].tolist()
            generated = len(out) + (reason == "stop")
            fl = F.sample_flops(
                self.cfg,
                num_tiles=r.num_tiles,
                text_tokens=len(ids[i]) - len(kept),
                kept_visual=len(kept),
                generated=generated,
                probe=(self.method.probe_layer(), r.instruction[1] - r.instruction[0])
                if self.method.probe_layer() is not None else None,
                layer_lengths=lengths,
                vit_score=self.method.vit_score_layer() is not None,
            )
            results.append(Result(
                tokens=out, logprobs=outp, finish_reason=reason, prompt_tokens=len(ids[i]),
                visual_before=r.num_tiles * ntok, visual_after=len(kept), visual_after_per_tile=per_tile,
                kept=kept, layer_lengths=lengths, flops=fl.as_dict(), timing=dict(times),
                batch_size=len(requests),
            ))
        return results
