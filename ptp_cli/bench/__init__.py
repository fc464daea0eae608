"""``ptp bench``: ptp's engine side by side with transformers' ``InternVLForConditionalGeneration.generate``.

One process, one run, the same synthetic requests for every row: the transformers peer (sdpa attention, the
same dtype, a left-padded batch), ptp without pruning, and ptp with each pruning method at each ratio. Every
row is warmed up, then timed ``repeats`` times with the device synchronised around each clock reading; the
report gives medians with min/max, per-stage times, peak device memory, analytic FLOPs, the achieved prefill
rate against a dense matmul measured in the same run, and speedups as ratios of samples/s medians.

- ``config``: ``BenchConfig`` and option parsers;
- ``workload``: the model under test and its synthetic requests (through ``ptp_cli.preprocess.inputs.InputProcessor``);
- ``peer``: the transformers model and its runner;
- ``vllm_peer``: with ``--engine vllm``, why vLLM's own InternVL2 is no row, and its stand-in ``vllm none``;
- ``measurement``: runners, timing, memory, the dense matmul rate;
- ``targets``: the performance targets, as a table;
- ``report``: ``BenchReport`` and the text table;
- ``run``: ``plan_bench`` and ``run_bench``.
"""

from ptp_cli.bench.config import BenchConfig, parse_image_size, parse_methods, parse_ratios
from ptp_cli.bench.measurement import BenchRow, Stat
from ptp_cli.bench.peer import PEER, peer_config
from ptp_cli.bench.report import SCHEMA_VERSION, BenchReport, format_report
from ptp_cli.bench.run import Plan, plan_bench, run_bench
from ptp_cli.bench.targets import TARGETS, Check, Target

__all__ = [
    "PEER", "SCHEMA_VERSION", "TARGETS", "BenchConfig", "BenchReport", "BenchRow", "Check", "Plan", "Stat",
    "Target", "format_report", "parse_image_size", "parse_methods", "parse_ratios", "peer_config", "plan_bench",
    "run_bench",
]
