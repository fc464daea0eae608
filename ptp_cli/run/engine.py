"""The batched InternVL engine: ViT -> (pruning) -> LLM prefill -> decoding, on tensors and token ids.

The engine knows nothing about tokenization, images on disk or prompt text: a ``Request`` carries
prompt token ids with one placeholder id per visual token, the tiles' pixel values, and the spans
the pruning methods need. ``Engine.generate`` runs one batch (any mix of tile counts) and returns one
``Result`` per request, in order, through named stages that can also be called one by one:

    encode_images -> select (probe + pruning method) -> build_prompts -> prefill -> decode (step by step)

Every row is computed as it would be alone: prompts are right-padded (exactly causal for real tokens), and RoPE
scaling is chosen per row from that row's own length (``models/llm.py``), never for the batch as a whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ptp_cli.models.internvl import InternVLModel
from ptp_cli.models.llm import LayerCache, sequence_lengths
from ptp_cli.pruning.base import LayerState, NoPruning, PruningMethod, VisualContext
from ptp_cli.pruning.scores import instruction_scores, vit_token_scores
from ptp_cli.run import flops as F
from ptp_cli.run.batching import compact, right_pad
from ptp_cli.run.devices import StageClock, out_of_memory_stage
from ptp_cli.run.positions import contiguous_positions, pad_positions, unpruned_positions
from ptp_cli.run.vision_cache import VisionCache, VisionEntry
from ptp_cli.run.vision_prune import encode_pruned


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
    full_tiles: int | None = None  # tiles before a ``retiles`` method re-tiled the image (None: num_tiles)

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])


@dataclass
class Result:
    tokens: list[int]  # generated ids, the stop token excluded
    logprobs: list[float]  # log-probability of each generated token under the model (temperature 1)
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int  # tokens the LLM's first layer saw (pruned prompt)
    visual_before: int  # visual tokens from the ViT (``tiles``: of the tiling it replaced)
    visual_after: int  # visual tokens entering the LLM
    visual_after_per_tile: list[int]  # kept per tile
    kept: list[int]  # kept visual token indices in [0, visual_before) (tile t, token i -> 256*t + i)
    layer_lengths: list[int]  # tokens each LLM layer processed in prefill (in-LLM methods shorten later ones)
    flops: dict[str, int]  # per stage, 2 FLOPs per multiply-add
    timing: dict[str, float] = field(default_factory=dict)  # seconds per stage of the batch this ran in
    batch_size: int = 1  # requests in that batch
    pruning: dict[str, Any] = field(default_factory=dict)  # the method's notes on this sample (PTP: alpha, signals)


@dataclass
class VisualFeatures:
    """The ViT stage's output for a batch, per sample."""

    features: list[torch.Tensor]  # [T_i * 256, D] projected visual tokens, in tile order
    cls: list[torch.Tensor]  # [T_i, Cv] last-layer CLS embedding of each tile
    token_scores: list[torch.Tensor] | None  # [T_i, 256] CLS->patch attention at the method's ViT layer
    available: list[torch.Tensor | None] | None = None  # [K1_i] tokens the ViT kept (stage 1); None: all


@dataclass
class Selection:
    """The pre-LLM pruning decision for a batch, per sample."""

    keep: list[torch.Tensor | None]  # [K_i] kept visual token indices in [0, T_i * 256), or None: all of them
    notes: list[dict[str, Any]]  # what the method noted about each choice (``VisualContext.notes``)
    features: list[torch.Tensor]  # [T_i * 256, D] what kept tokens take their features from (merged by ``pool``)


@dataclass
class Prompts:
    """A batch of (pruned) prompts, embedded and right-padded: the input of prefill (and of the probe)."""

    ids: list[torch.Tensor]  # [S_i] each sample's prompt ids, discarded visual placeholders removed
    kept: list[torch.Tensor]  # [K_i] kept visual token indices in [0, T_i * 256)
    x: torch.Tensor  # [B, S, D] embeddings, visual features written over their placeholders
    valid: torch.Tensor  # [B, S] real tokens (padding at the end of each row)
    positions: torch.Tensor  # [B, S] RoPE positions: contiguous, or the unpruned ones (``positions.py``)
    visual: torch.Tensor  # [B, S] kept visual tokens
    instruction: torch.Tensor  # [B, S] the question's tokens


@dataclass
class DecodeState:
    """What decoding continues from; ``Engine.step`` advances it by one token per row."""

    caches: list[LayerCache]  # one per LLM layer (a layer that kept fewer tokens has a shorter one)
    logits: torch.Tensor  # [B, V] fp32 logits of each row's next token
    next_pos: torch.Tensor  # [B] position of each row's next token
    layer_tokens: torch.Tensor  # [B, L] real tokens each layer processed in prefill


class Engine:
    kind = "ptp"  # which engine generates (reports label rows with it)

    def __init__(
        self,
        model: InternVLModel,
        *,
        image_token_id: int,
        method: PruningMethod | None = None,
        vit_batch: int = 64,
        vision_cache: VisionCache | None = None,
    ) -> None:
        self.model = model
        self.image_token_id = image_token_id
        self.method = method or NoPruning()
        self.vit_batch = vit_batch  # tiles per ViT call: bounds activation memory
        self.vision_cache = vision_cache  # shared by engines that run the same images (the eval grid)
        self.cfg = model.cfg

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request]) -> list[Result]:
        """Run one batch through every stage; one ``Result`` per request, in order."""
        if not requests:
            return []
        clock = StageClock(self.model.device)
        _, selection = self.encode_and_select(requests, clock)
        with out_of_memory_stage("prefill"):
            prompts = self.build_prompts(requests, selection.features, selection.keep)
            state = self.prefill(prompts, room=max(r.max_new_tokens for r in requests))
        clock.lap("prefill")
        with out_of_memory_stage("decode"):
            tokens, logps = self.decode(requests, state)
        clock.lap("decode")
        return self._results(requests, prompts, state.layer_tokens, tokens, logps, clock.times, selection.notes)

    def encode_and_select(self, requests: Sequence[Request], clock: StageClock) -> tuple[VisualFeatures, Selection]:
        """The stages before the LLM (checks, ViT, the method's scores and choice), timed as vit and probe: what
        any engine that generates from the pruned prompts runs first."""
        self.check(requests)
        with out_of_memory_stage("vit"):
            visual = self.encode_images(requests)
        clock.lap("vit")
        with out_of_memory_stage("probe"):
            selection = self.select(requests, visual)
        clock.lap("probe")
        return visual, selection

    # ------------------------------------------------------------------------------------------ stages

    def check(self, requests: Sequence[Request]) -> None:
        """Every request carries one placeholder id per visual token, from its image_start on."""
        ntok = self.cfg.tokens_per_tile
        for r in requests:
            n = r.num_tiles * ntok
            placeholders = sum(1 for t in r.ids[r.image_start : r.image_start + n] if t == self.image_token_id)
            if placeholders != n:
                raise ValueError(f"request has {placeholders} image placeholders at image_start, expected {n}")

    @torch.inference_mode()
    def encode_images(self, requests: Sequence[Request]) -> VisualFeatures:
        """ViT + projector over every tile of the batch, in chunks of ``vit_batch`` tiles (images already in
        the vision cache, if there is one, are not run again)."""
        m, available = self.method, None
        cache = self.vision_cache if m.vit_prune_layer() is None else None  # stage 1's output depends on the method
        layer = m.vit_score_layer()
        keys = [cache.key(r.pixel_values) for r in requests] if cache is not None else [None] * len(requests)
        entries = [cache.get(k, layer) if cache is not None and k is not None else None for k in keys]
        if m.vit_prune_layer() is not None:
            entries, available = encode_pruned(self.model, requests, m, vit_batch=self.vit_batch)
        elif todo := [r for r, e in zip(requests, entries, strict=True) if e is None]:
            fresh = iter(self._run_vit(todo, layer))
            entries = [e if e is not None else next(fresh) for e in entries]
            if cache is not None:
                for k, e in zip(keys, entries, strict=True):
                    cache.put(k, e)
        return VisualFeatures(
            features=[e.features.flatten(0, 1) for e in entries],
            cls=[e.cls for e in entries],
            token_scores=[
                vit_token_scores(e.cls_attn, head_agg=m.head_aggregation(), model_cfg=self.cfg) for e in entries
            ] if layer is not None else None,
            available=available,
        )

    def _run_vit(self, requests: Sequence[Request], layer: int | None) -> list[VisionEntry]:
        pix = torch.cat([r.pixel_values for r in requests]).to(self.model.device, self.model.dtype)
        feats, cls, attn = [], [], []
        for chunk in pix.split(self.vit_batch):
            out = self.model.vision_features(chunk, cls_attn_layer=layer)
            feats.append(out.features)  # [t, 256, D]
            cls.append(out.cls)
            attn.append(out.cls_attn)  # [t, H, P] or None
        splits = [r.num_tiles for r in requests]
        per_attn = list(torch.cat(attn).split(splits)) if layer is not None else [None] * len(requests)
        return [
            VisionEntry(features=f, cls=c, cls_attn=a, layer=layer)
            for f, c, a in zip(torch.cat(feats).split(splits), torch.cat(cls).split(splits), per_attn, strict=True)
        ]

    @torch.inference_mode()
    def probe(self, requests: Sequence[Request], features: list[torch.Tensor],
              available: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """Instruction scores of every visual token [T_i * 256], from LLM layer M on the unpruned prompts (with
        stage 1, on the tokens the ViT kept: the others score 0)."""
        m, available = self.method, available or [None] * len(requests)
        layer = m.probe_layer()
        assert layer is not None
        p = self.build_prompts(requests, features, available)
        dev = p.x.device
        counts = [k.numel() for k in p.kept]
        # Each row's visual slots; a row with fewer tiles repeats its last one (those columns are cut below).
        offsets = torch.arange(max(counts), device=dev)[None, :].minimum(torch.tensor(counts, device=dev)[:, None] - 1)
        columns = torch.tensor([r.image_start for r in requests], device=dev)[:, None] + offsets  # [B, V]
        scores = instruction_scores(
            self.model.language_model, p.x, p.positions, p.valid, p.instruction, columns=columns,
            layer=layer, head_agg=m.head_aggregation(), instr_agg=m.instruction_aggregation(),
        )  # [B, V]
        return [scores.new_zeros(f.shape[0]).index_put_((k,), scores[i, : k.numel()])
                for i, (f, k) in enumerate(zip(features, p.kept, strict=True))]

    @torch.inference_mode()
    def select(self, requests: Sequence[Request], visual: VisualFeatures) -> Selection:
        """The pre-LLM pruning decision: kept visual token indices per sample, and the method's notes."""
        m = self.method
        ctx = VisualContext(
            tiles=[r.num_tiles for r in requests],
            has_thumbnail=[r.has_thumbnail and r.num_tiles > 1 for r in requests],
            tokens_per_tile=self.cfg.tokens_per_tile,
            cls=visual.cls,
            token_scores=visual.token_scores,
            instruction_scores=self.probe(requests, visual.features, visual.available)
            if m.probe_layer() is not None else None, seeds=[r.seed for r in requests], available=visual.available,
            full_tiles=[r.full_tiles or r.num_tiles for r in requests],
        )
        keep = m.select(ctx)
        return Selection(keep=keep, notes=ctx.notes, features=m.merge_features(ctx, visual.features))

    def build_prompts(
        self, requests: Sequence[Request], features: list[torch.Tensor], keep: Sequence[torch.Tensor | None]
    ) -> Prompts:
        """Drop the placeholders (and features) of discarded visual tokens, embed, right-pad; positions as the
        method says (contiguous, or the unpruned ones)."""
        dev = self.model.device
        ids, kept, spans, unpruned = [], [], [], []
        for r, v, k in zip(requests, features, keep, strict=True):
            n = v.shape[0]
            k = torch.arange(n, device=dev) if k is None else k.to(dev)
            row = torch.tensor(r.ids, device=dev)
            ids.append(torch.cat([row[: r.image_start], row[r.image_start + k], row[r.image_start + n :]]))
            kept.append(k)
            unpruned.append(unpruned_positions(prompt_len=len(r.ids), image_start=r.image_start, num_visual=n, kept=k))
            dropped = n - k.numel()
            spans.append((r.image_start, r.image_start + k.numel(), r.instruction[0] - dropped,
                          r.instruction[1] - dropped))
        b, s = len(requests), max(len(i) for i in ids)
        emb = self.model.language_model.tok_embeddings
        rows = []
        for row, v, k, (v0, _, _, _) in zip(ids, features, kept, spans, strict=True):
            e = emb(row)  # [S_i, D]
            e[v0 : v0 + k.numel()] = v[k].to(e.dtype)
            rows.append(e)
        valid = right_pad([torch.ones(len(i), dtype=torch.bool, device=dev) for i in ids], s, False)
        visual = torch.zeros(b, s, dtype=torch.bool, device=dev)
        instruction = torch.zeros_like(visual)
        for i, (v0, v1, q0, q1) in enumerate(spans):
            visual[i, v0:v1] = True
            instruction[i, q0:q1] = True
        return Prompts(
            ids=ids, kept=kept, x=right_pad(rows, s, 0.0), valid=valid, visual=visual, instruction=instruction,
            positions=pad_positions(unpruned, valid) if self.method.original_positions()
            else contiguous_positions(valid),
        )

    @torch.inference_mode()
    def prefill(self, p: Prompts, *, room: int) -> DecodeState:
        """Every LLM layer over the prompts; in-LLM methods may drop tokens between layers.

        Each layer's KV cache holds its prompt tokens plus ``room`` decoding steps.
        """
        lm, m = self.model.language_model, self.method
        x, valid, positions, visual, instr = p.x, p.valid, p.positions, p.visual, p.instruction
        b = x.shape[0]
        # Each row's own prompt length picks its RoPE scaling; dropping tokens keeps positions, so it stays.
        lengths = sequence_lengths(positions, valid)  # [B]
        cos, sin = lm.rotary(positions, x.dtype, lengths=lengths)
        drops = m.drop_layers() if m.prunes_in_llm else frozenset()
        caches: list[LayerCache] = []
        layer_tokens = []  # per layer, real tokens of each sample [B] (kept on device: no sync per layer)
        for j, layer in enumerate(lm.layers):
            caches.append(lm.new_cache(b, x.shape[1] + room))
            layer_tokens.append(valid.sum(-1))
            out = layer(x, cos, sin, caches[-1], valid, causal=True)  # right-padded: causal is exact
            x = out.hidden
            if j in drops and j + 1 < len(lm.layers):
                mask = m.after_layer(LayerState(
                    layer=j, hidden=x, q=out.q, keys=out.keys, valid=valid, visual=visual,
                    instruction=instr, last=valid.sum(-1) - 1,
                ))
                if mask is not None:
                    x, valid, positions, visual, instr = compact(
                        mask & valid, x, valid, positions, visual, instr
                    )
                    cos, sin = lm.rotary(positions, x.dtype, lengths=lengths)
        last = valid.sum(-1) - 1  # [B] each row's last real token
        rows = torch.arange(b, device=x.device)
        return DecodeState(
            caches=caches, logits=lm.logits(x[rows, last]), next_pos=positions[rows, last] + 1,
            layer_tokens=torch.stack(layer_tokens, 1),
        )

    @torch.inference_mode()
    def step(self, state: DecodeState, tok: torch.Tensor) -> None:
        """Feed one token per row (tok [B]) through every layer, appending to the caches; updates ``state``."""
        lm = self.model.language_model
        h = lm.tok_embeddings(tok)[:, None]  # [B, 1, D]
        # The row's length with this token picks its RoPE scaling; cached keys keep the one they were rotated with.
        cos, sin = lm.rotary(state.next_pos[:, None], h.dtype, lengths=state.next_pos + 1)
        ones = torch.ones(h.shape[0], 1, dtype=torch.bool, device=h.device)
        for layer, cache in zip(lm.layers, state.caches, strict=True):
            h = layer(h, cos, sin, cache, ones).hidden
        state.logits = lm.logits(h[:, -1])
        state.next_pos = state.next_pos + 1

    @torch.inference_mode()
    def decode(self, requests: Sequence[Request], state: DecodeState) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per step for the whole batch until every row has stopped or reached its limit.

        Returns the tokens and their log-probabilities [B, steps]; rows that stopped earlier are cut later.
        """
        dev = state.logits.device
        gens = [torch.Generator(device=dev).manual_seed(r.seed) for r in requests]
        temps = [r.temperature for r in requests]
        stop = torch.full((len(requests), max(1, *(len(r.stop_ids) for r in requests))), -1, device=dev)
        for i, r in enumerate(requests):
            if not r.ignore_eos and r.stop_ids:
                stop[i, : len(r.stop_ids)] = torch.tensor(list(r.stop_ids), device=dev)
        limits = torch.tensor([r.max_new_tokens for r in requests], device=dev)
        max_new = max(r.max_new_tokens for r in requests)
        done = limits <= 0
        tokens, logps = [], []
        steps = 0
        while True:
            tok = self._pick(state.logits, temps, gens)  # [B]
            tokens.append(tok)
            logps.append(torch.log_softmax(state.logits, -1).gather(1, tok[:, None])[:, 0])
            steps += 1
            done = done | (tok[:, None] == stop).any(-1) | (steps >= limits)
            # Reading `done` syncs with the device: do it every few steps (extra tokens are cut off later).
            if steps >= max_new or (steps % 4 == 0 and bool(done.all())):
                break
            self.step(state, tok)
        return torch.stack(tokens, 1), torch.stack(logps, 1)

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

    def _results(
        self, requests: Sequence[Request], prompts: Prompts, layer_tokens: torch.Tensor, tokens: torch.Tensor,
        logps: torch.Tensor, times: dict[str, float], notes: list[dict[str, Any]],
    ) -> list[Result]:
        """Cut each row at its stop token or limit; count tokens and FLOPs."""
        tok, lp = tokens.tolist(), logps.tolist()  # [B, steps]
        layer_tokens = layer_tokens.cpu()
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
            results.append(self.result(
                r, prompt_tokens=len(prompts.ids[i]), kept=prompts.kept[i].tolist(), tokens=out, logprobs=outp,
                finish_reason=reason, layer_lengths=layer_tokens[i].tolist(), timing=times,
                batch_size=len(requests), notes=notes[i],
            ))
        return results

    def result(
        self, r: Request, *, prompt_tokens: int, kept: list[int], tokens: list[int], logprobs: list[float],
        finish_reason: str, layer_lengths: list[int], timing: dict[str, float], batch_size: int,
        notes: dict[str, Any],
    ) -> Result:
        """One request's ``Result``: token counts and FLOPs from what ran (also for engines that generate
        elsewhere, e.g. vLLM, from this engine's selection). ``tokens`` exclude the stop token."""
        ntok = self.cfg.tokens_per_tile
        per_tile = [0] * r.num_tiles
        for k in kept:
            per_tile[k // ntok] += 1
        probe = self.method.probe_layer()
        fl = F.sample_flops(
            self.cfg,
            num_tiles=r.num_tiles,
            text_tokens=prompt_tokens - len(kept),
            kept_visual=len(kept),
            generated=len(tokens) + (finish_reason == "stop"),
            probe=(probe, r.instruction[1] - r.instruction[0]) if probe is not None else None,
            layer_lengths=layer_lengths,
            vit_score=self.method.vit_score_layer() is not None,
            vit_kept=(self.method.vit_prune_layer(), notes["vit_kept_per_tile"]) if "vit_kept_per_tile" in notes else None,
        )
        return Result(
            tokens=tokens, logprobs=logprobs, finish_reason=finish_reason, prompt_tokens=prompt_tokens,
            visual_before=(r.full_tiles or r.num_tiles) * ntok, visual_after=len(kept), visual_after_per_tile=per_tile,
            kept=kept, layer_lengths=layer_lengths, flops=fl.as_dict(), timing=dict(timing),
            batch_size=batch_size, pruning=notes,
        )
