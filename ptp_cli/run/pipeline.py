"""The library API behind ``ptp infer``: records in, result rows out.

``Pipeline`` ties the layers together: images are loaded and tiled and prompts tokenised in background
threads (``prepare``), requests are batched, the engine runs them, and each record becomes one row --
a result or an error row carrying its id. It is usable from Python directly (or inside a Ray Data
actor): ``Pipeline.load(RunConfig(model="tiny")).infer(records)``.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ptp_cli.config import ModelConfig
from ptp_cli.errors import ModelLoadError, PromptError, RecordError
from ptp_cli.io.records import BadRecord, Record, error_row, result_row, shown_record
from ptp_cli.loading import LoadedModel
from ptp_cli.preprocess.inputs import InputProcessor, RequestDefaults
from ptp_cli.pruning import make_method
from ptp_cli.run.devices import free_cached_memory
from ptp_cli.run.engine import Engine, Request, Result
from ptp_cli.run.failures import FailureGuard, batch_failure
from ptp_cli.run.vllm_engine import Submitted, VLLMEngine, VLLMGenerator, free_unused_layers, view_key
from ptp_cli.run_config import RunConfig, check_against_model, read_model_config
from ptp_cli.text.chat_template import prompter_for
from ptp_cli.zoo import load_model

__all__ = ["Pipeline", "Prepared", "RunConfig", "read_model_config", "run_settings", "start_vllm"]


def run_settings(config: RunConfig, model_cfg: ModelConfig, *, dtype: torch.dtype, template: str) -> dict[str, Any]:
    """What decides the results (echoed in every row, fingerprinted by --resume), from the config alone.

    ``template``: the prompt template's name (``chat_template.template_name`` reads it without the model).
    """
    method = make_method(config.prune, model_cfg)
    tiling = config.tiling(model_cfg)
    return {
        "model": model_cfg.name or config.model,
        "template": template,
        **method.settings(),
        "method": method.name,
        "max_tiles": tiling.max_tiles,
        "min_tiles": tiling.min_tiles,
        "max_new_tokens": config.max_new_tokens,
        "temperature": float(config.temperature),
        "seed": config.seed,
        "dtype": str(dtype).removeprefix("torch."),
        **({"engine": config.engine} if config.engine != "ptp" else {}),  # absent for ptp: old outputs resume
    }


def start_vllm(loaded: LoadedModel, config: RunConfig) -> VLLMGenerator:
    """vLLM serving the checkpoint's LLM (``--engine vllm``); eager on a CPU, where compiling costs minutes."""
    from ptp_cli.home import ptp_home

    view = ptp_home() / "vllm" / view_key(loaded.path, loaded.model.dtype)
    return VLLMGenerator(loaded.model, view_dir=view, seed=config.seed, enforce_eager=loaded.model.device.type == "cpu",
                         gpu_memory=config.vllm_memory)


@dataclass
class InFlight:
    """A batch handed to a background engine (``submitted``), or, when it had to be split, its rows already."""

    batch: list[tuple[int, Prepared]]
    submitted: Submitted | None
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


@dataclass
class Prepared:
    """A record turned into an engine request (done in a worker thread)."""

    record: Record
    request: Request
    preprocess_s: float


class Pipeline:
    def __init__(
        self, loaded: LoadedModel, config: RunConfig, *, engine: Engine | VLLMEngine | None = None,
        checked: bool = False, in_flight: int | None = None,
    ) -> None:
        """``engine``: run requests on this one instead of building one from ``loaded`` and ``config.prune`` (it
        must prune as ``config.prune`` says: rows echo those settings). ``checked``: ``config`` was already
        checked against this model (``read_model_config``), so it is not checked again. ``in_flight``: batches
        left generating while the next is prepared, on an engine that generates in the background (vLLM;
        None: 2; 0: one batch at a time, as ptp's own engine runs)."""
        if not checked:
            check_against_model(config, loaded.cfg)
        self.loaded = loaded
        self.config = config
        self.cfg = loaded.cfg
        self.tokenizer = loaded.tokenizer
        self.prompter = prompter_for(loaded.path, self.cfg, self.tokenizer, system_message=config.system_message)
        try:  # a template that does not fit the checkpoint fails here, once, not as an error row per record
            self.prompter.encode(question="?", num_image_tokens=self.cfg.tokens_per_tile)
        except PromptError as e:
            raise ModelLoadError(f"prompt template {self.prompter.name!r} does not fit this checkpoint: {e}") from None
        self.tiling = config.tiling(self.cfg)
        self.engine = engine or self._make_engine()
        background = isinstance(self.engine, VLLMEngine)
        self.in_flight = (2 if in_flight is None else in_flight) if background else 0
        max_positions = self.cfg.llm.context_length
        if isinstance(self.engine, VLLMEngine):  # vLLM refuses prompts past its max_model_len: refuse them first
            max_positions = min(max_positions, self.engine.max_model_len)
        self.inputs = InputProcessor(
            encoder=self.prompter, tiling=self.tiling, tokens_per_tile=self.cfg.tokens_per_tile,
            pixel_dtype=loaded.model.dtype, max_pixels=config.max_pixels,
            max_positions=max_positions, max_prompt_tokens=config.max_prompt_tokens,
            retile_ratio=config.prune.ratio if self.engine.method.retiles else None,
            defaults=RequestDefaults(
                max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=config.seed
            ),
        )

    def _make_engine(self) -> Engine | VLLMEngine:
        method = make_method(self.config.prune, self.cfg)
        if self.config.engine == "vllm":  # an in-LLM method was refused by check_against_model
            generator = start_vllm(self.loaded, self.config)  # writes vLLM's view of the LLM first
            free_unused_layers(self.loaded.model, [method])
            return VLLMEngine(self.loaded.model, image_token_id=self.loaded.image_token_id, method=method,
                              generator=generator)
        return Engine(self.loaded.model, image_token_id=self.loaded.image_token_id, method=method)

    @classmethod
    def load(cls, config: RunConfig, *, checked: bool = False) -> Pipeline:
        """Load the model ``config`` names and build the pipeline. ``checked``: the caller already ran
        ``read_model_config(config)`` (a CLI does, before anything heavy); otherwise it runs here."""
        if not checked:
            read_model_config(config)  # a bad layer index fails before the weights load
        device = config.resolved_device()
        loaded = load_model(config.model, dtype=config.resolved_dtype(device), device=device)
        return cls(loaded, config, checked=True)

    # ------------------------------------------------------------------------------------------ settings

    def settings(self) -> dict[str, Any]:
        """What decides the results; echoed in every row and fingerprinted by --resume."""
        return run_settings(self.config, self.cfg, dtype=self.loaded.model.dtype, template=self.prompter.name)

    # ------------------------------------------------------------------------------------------ stages

    def prepare(self, record: Record) -> Prepared:
        """Load, tile and tokenise one record (thread-safe). Raises RecordError for bad input."""
        t0 = time.perf_counter()
        request = self.inputs.process(record)
        return Prepared(record, request, time.perf_counter() - t0)

    def _row(self, p: Prepared, r: Result, settings: dict[str, Any]) -> dict[str, Any]:
        answer = self.tokenizer.decode(r.tokens, skip_special_tokens=True).strip()
        result: dict[str, Any] = {
            "answer": answer,
            "finish_reason": r.finish_reason,
            "logprob": (sum(r.logprobs) / len(r.logprobs)) if r.logprobs else None,
            "tokens": {
                "visual_before": r.visual_before,
                "visual_after": r.visual_after,
                "visual_per_tile": r.visual_after_per_tile,
                "tiles": p.request.num_tiles,
                "prompt": r.prompt_tokens,
                "generated": len(r.tokens),
            },
            "timing": {"preprocess": round(p.preprocess_s, 6), **{k: round(v, 6) for k, v in r.timing.items()},
                       "batch": r.batch_size},
            "flops": r.flops,
            "method": self.engine.method.name,
        }
        if r.pruning:  # what the method chose for this record (PTP: the alpha used and the score signals)
            result["pruning"] = {k: v for k, v in r.pruning.items() if k != "vit_kept"}  # indices: with --kept
        if self.config.logprobs:
            result["logprobs"] = {"ids": r.tokens, "values": r.logprobs}
        if self.config.kept:
            result["kept"] = r.kept
            if "vit_kept" in r.pruning:  # what the ViT kept (stage 1 of --vit-prune): ptp show draws both stages
                result["vit_kept"] = r.pruning["vit_kept"]
            result["record"] = shown_record(p.record)
        return result_row(p.record, result, settings=settings)

    def _rows_of(self, batch: list[tuple[int, Prepared]], results: list[Result | RecordError],
                 settings: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
        for (seq, p), r in zip(batch, results, strict=True):
            if isinstance(r, RecordError):  # the engine refused this record's prompt (vLLM's own input checks)
                yield seq, error_row(p.record.line, p.record.id, r, settings=settings, extra=p.record.extra)
            else:
                yield seq, self._row(p, r, settings)

    def _submit(self, batch: list[tuple[int, Prepared]], settings: dict[str, Any]) -> InFlight:
        """Start a batch on an engine that generates in the background (vLLM). A failure a record can cause
        (out of memory in the ViT) falls back to ``_run_batch``, which halves the batch and waits for it."""
        try:
            return InFlight(batch, self.engine.submit([p.request for _, p in batch]))
        except Exception as e:
            if batch_failure(e) is None:
                raise
        free_cached_memory()
        return InFlight(batch, None, list(self._run_batch(batch, settings)))

    def _finish(self, item: InFlight, settings: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
        if item.submitted is None:
            yield from item.rows
        else:
            yield from self._rows_of(item.batch, self.engine.collect(item.submitted), settings)

    def _run_batch(self, batch: list[tuple[int, Prepared]], settings) -> Iterator[tuple[int, dict[str, Any]]]:
        """Rows of a batch. A failure a record can cause (out of memory on any device, say) splits the batch in
        halves, down to single records; a record failing alone gets an out_of_memory or inference_error row.
        Anything else (a bug) propagates."""
        try:
            results = self.engine.generate([p.request for _, p in batch])
        except Exception as e:
            failure = batch_failure(e)
            if failure is None:
                raise
        else:
            yield from self._rows_of(batch, results, settings)
            return
        # Retried outside the except block: its traceback would keep the failed batch's tensors alive.
        free_cached_memory()
        if len(batch) == 1:
            seq, p = batch[0]
            err = failure.error()
            yield seq, error_row(p.record.line, p.record.id, err, settings=settings, extra=p.record.extra)
            return
        half = len(batch) // 2
        yield from self._run_batch(batch[:half], settings)
        yield from self._run_batch(batch[half:], settings)

    # ------------------------------------------------------------------------------------------ run

    def run(self, items: Iterable[Record | BadRecord]) -> Iterator[tuple[int, dict[str, Any]]]:
        """Rows for the items, as ``(seq, row)`` with seq the item's 0-based position in ``items``.

        Rows come mostly in order (error rows may come early); memory stays bounded: at most a few
        batches of records are read ahead. Raises ``RunAborted`` after the row that shows failures are
        systematic (``failures.FailureGuard``), and any exception a record cannot cause (a bug) as it is.
        """
        guard = FailureGuard(max_errors=self.config.max_errors)
        with contextlib.closing(self._rows(items)) as rows:
            for seq, row in rows:
                yield seq, row
                guard.observe(row)

    def _rows(self, items: Iterable[Record | BadRecord]) -> Iterator[tuple[int, dict[str, Any]]]:
        settings = self.settings()
        c = self.config
        lookahead = self._lookahead()
        pending: deque[tuple[int, Record, Future]] = deque()
        ready: list[tuple[int, Prepared]] = []
        inflight: deque[InFlight] = deque()  # batches vLLM generates while the next ones are prepared
        it = enumerate(items)
        exhausted = False
        next_seq = 0

        def within_window() -> bool:
            # Bad records yield at once: they must not run more than a window ahead of the oldest pending one
            # (in flight: the first batch's first record, the oldest ready one when it was batched).
            oldest = (inflight[0].batch[0][0] if inflight else ready[0][0] if ready else pending[0][0] if pending
                      else next_seq)
            return next_seq - oldest < self.reorder_window

        pool = ThreadPoolExecutor(max_workers=c.workers, thread_name_prefix="ptp-prep")
        try:
            while True:
                while not exhausted and len(pending) < lookahead and within_window():
                    try:
                        seq, item = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    next_seq = seq + 1
                    if isinstance(item, BadRecord):
                        yield seq, error_row(item.line, item.id, item.error, settings=settings)
                    else:
                        pending.append((seq, item, pool.submit(self.prepare, item)))
                if not pending and not ready:  # nothing to batch: the input is done, or waits on the window
                    if not inflight:
                        return
                    yield from self._finish(inflight.popleft(), settings)
                    continue
                # Gather a pool of prepared requests, then batch those of similar length together.
                if pending and len(ready) < self._pool_size():
                    seq, record, fut = pending.popleft()
                    try:
                        ready.append((seq, fut.result()))
                    except RecordError as e:  # bad input; any other exception is a bug and ends the run
                        yield seq, error_row(record.line, record.id, e, settings=settings, extra=record.extra)
                    if pending or (not exhausted and within_window()):
                        continue
                if ready and self.in_flight:
                    inflight.append(self._submit(self._take_batch(ready), settings))
                    if len(inflight) > self.in_flight:
                        yield from self._finish(inflight.popleft(), settings)
                elif ready:
                    yield from self._run_batch(self._take_batch(ready), settings)
        finally:  # also on an early exit (Ctrl-C, a closed generator): skip the queued preprocessing
            pool.shutdown(wait=True, cancel_futures=True)
            for item in inflight:  # and the queued generation
                if item.submitted is not None:
                    self.engine.cancel(item.submitted)

    def _take_batch(self, ready: list[tuple[int, Prepared]]) -> list[tuple[int, Prepared]]:
        """Remove and return the next batch from ``ready`` (in seq order): the oldest request, so every
        record makes progress, plus those closest to it in length, so little of the batch is padding.
        ``max_batch_tokens`` bounds the padded size (requests x longest prompt)."""
        c = self.config
        anchor = len(ready[0][1].request.ids)
        order = sorted(range(len(ready)), key=lambda i: (abs(len(ready[i][1].request.ids) - anchor), i))
        chosen, longest = [], 0
        for i in order:
            if len(chosen) == c.batch_size:
                break
            n = max(longest, len(ready[i][1].request.ids))
            if chosen and c.max_batch_tokens is not None and n * (len(chosen) + 1) > c.max_batch_tokens:
                continue
            chosen.append(i)
            longest = n
        picked = set(chosen)
        batch = [ready[i] for i in sorted(picked)]
        ready[:] = [item for i, item in enumerate(ready) if i not in picked]
        return batch

    def _pool_size(self) -> int:
        """Prepared requests gathered before a batch is chosen among them (length bucketing)."""
        return 2 * self.config.batch_size

    def _lookahead(self) -> int:
        """Records being prepared at once."""
        return max(self.config.batch_size, 4 * self.config.workers)

    @property
    def reorder_window(self) -> int:
        """A bound on how far ``run`` reorders: every row's seq is below the oldest seq not yet yielded plus
        this (the ``window`` an ``OrderedWriter`` needs)."""
        return self._lookahead() + self._pool_size() + (1 + self.in_flight) * self.config.batch_size

    def infer(self, items: Iterable[Record | BadRecord]) -> Iterator[dict[str, Any]]:
        """Rows in input order (a small reorder buffer over ``run``)."""
        buffer: dict[int, dict[str, Any]] = {}
        nxt = 0
        for seq, row in self.run(items):
            buffer[seq] = row
            while nxt in buffer:
                yield buffer.pop(nxt)
                nxt += 1
