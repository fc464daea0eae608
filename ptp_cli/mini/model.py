"""ptp-mini: a miniature InternVL2 (real geometry, tiny widths) and its tokenizer; the definition its shipped
weights (``checkpoint/``, ``--model mini``) were trained to. Training it lives outside the package
(``training/`` in the repository: initial weights, data, losses, export).

The checkpoint is written in OpenGVLab's original ``InternVLChatModel`` layout (InternLM2 backbone, template
``internlm2-chat``, InternVL2-2B's special tokens), so it loads through exactly the path real checkpoints take.
Depths keep ptp's default layers valid: PTP reads ViT layer 11 (the last of 12) and LLM layer 1; FastV's
layer 2 and PyramidDrop's stages (1, 2, 3) exist in a 4-layer LLM.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ptp_cli.builders.bpe import build_tiny_tokenizer
from ptp_cli.config import LLMConfig, ModelConfig, VisionConfig
from ptp_cli.synth.scene import ANSWERS, COLOURS, PLURALS, SHAPES, SUFFIX, question_text
from ptp_cli.text.prompts import INTERNVL2_SYSTEM_MESSAGE, TEMPLATES

__all__ = ["MINI", "MINI_MERGES", "build_mini_tokenizer", "mini_config", "mini_corpus"]

_VISION = VisionConfig(hidden_size=32, num_layers=12, num_heads=2, intermediate_size=128)
_LLM = LLMConfig(
    arch="internlm2", vocab_size=0, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
    num_kv_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-5, max_position_embeddings=32768,
)
# vocab_size is the tokenizer's (see mini_config).
MINI = ModelConfig(vision=_VISION, llm=_LLM, template="internlm2-chat", max_dynamic_patch=12, name="mini")
MINI_MERGES = 700  # BPE merges: every benchmark word and the system message become a few tokens


def mini_corpus() -> str:
    """The tokenizer's training text: the chat template, the system message, every question and answer word."""
    t = TEMPLATES[MINI.template]
    lines = [t.system_template.format(system_message=INTERNVL2_SYSTEM_MESSAGE), t.user_role, t.assistant_role]
    for s in SHAPES:
        lines += [question_text("color", (s,)), question_text("count", (s,)), f"{s} {PLURALS[s]}"]
    for c in COLOURS:
        lines += [question_text("shape", (c,)), question_text("text", (c, "circle"))]
        lines += [question_text("exist", (c, s)) for s in SHAPES]
        lines += [question_text("position", (c, s, c, s)) for s in SHAPES]
    lines += [" ".join(words) for words in ANSWERS.values()]
    lines += [a for words in ANSWERS.values() for a in words]  # an answer opens the assistant's line
    lines.append(SUFFIX)
    return "\n".join(lines * 3) + "\n"


def build_mini_tokenizer(out_dir: Path) -> None:
    build_tiny_tokenizer(out_dir, corpus=mini_corpus(), num_merges=MINI_MERGES)


def mini_config(vocab_size: int, *, vit_width: int = _VISION.hidden_size) -> ModelConfig:
    """The mini shape for a tokenizer; ``vit_width`` widens the ViT (heads of 16, MLP 4x, depth unchanged)."""
    heads = max(2, vit_width // 16)
    vision = replace(MINI.vision, hidden_size=vit_width, num_heads=heads, intermediate_size=4 * vit_width)
    return replace(MINI, vision=vision, llm=replace(MINI.llm, vocab_size=vocab_size))
