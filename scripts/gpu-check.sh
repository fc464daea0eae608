#!/usr/bin/env bash
# ptp's GPU checks in one command, on a CUDA machine with ptp installed (see the README's "GPU nodes"):
#   1. the gpu-marked tests (python -m pytest -m gpu);
#   2. the bench's target configuration (InternVL2-2B shapes, bf16, 7 tiles, batch 32, 16 new tokens),
#      whose table is written into docs/benchmarks.md under the device's name (between the gpu-check markers);
#      with vLLM importable, the same run with --engine vllm (its rows: vLLM generating from ptp's embeddings);
#   3. with vLLM importable, scripts/vllm_overlap.py on ptp-mini: ptp+vLLM streaming with 0 and 2 batches in flight.
# Without a GPU it says so and exits 1, having run nothing. Exit status: that of the first failing step.
# Environment: PYTHON (default python3), PTP_GPU_CHECK_DOC (default docs/benchmarks.md), PTP_GPU_CHECK_ARGS
# (extra `ptp bench` options, e.g. "--repeats 3").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DOC=${PTP_GPU_CHECK_DOC:-docs/benchmarks.md}

if ! device=$("$PYTHON" -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit(1)
print(torch.cuda.get_device_name(0))'); then
    echo "gpu-check: no GPU: torch.cuda.is_available() is False on this machine (torch $("$PYTHON" -c \
'import torch; print(torch.__version__)' 2>/dev/null || echo 'not importable')); nothing was run" >&2
    exit 1
fi
echo "gpu-check: device: $device" >&2

echo "gpu-check: 1/3 gpu-marked tests" >&2
"$PYTHON" -m pytest -q -m gpu tests

echo "gpu-check: 2/3 ptp bench, target configuration" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# shellcheck disable=SC2086  # PTP_GPU_CHECK_ARGS is a list of options
engine=ptp
if "$PYTHON" -c 'import vllm' 2>/dev/null; then
    engine=vllm
else
    echo "gpu-check: vLLM is not importable: the --engine vllm rows are skipped" >&2
fi
"$PYTHON" -m ptp_cli.cli.main bench --shape internvl2-2b --image-size 1344x896 --max-tiles 6 --batch-size 32 \
    --new-tokens 16 --dtype bfloat16 --device cuda --targets --engine "$engine" --json "$work/bench.json" \
    ${PTP_GPU_CHECK_ARGS:-} | tee "$work/table.txt"

"$PYTHON" scripts/gpu_section.py "$DOC" "$device" "$work/table.txt"

if [ "$engine" = vllm ]; then
    echo "gpu-check: 3/3 ptp+vLLM streaming, batches in flight 0 and 2 (ptp-mini)" >&2
    "$PYTHON" scripts/vllm_overlap.py --model mini --records 256 --batch-size 32 --new-tokens 16 --repeats 3
fi
