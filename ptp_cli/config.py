"""Model shapes as dataclasses, and a table of named sizes (the InternVL2 family).

Checkpoint parsing (``ptp_cli.loading``) turns a config.json into these; the model code only ever sees these.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

LLM_ARCHS = ("internlm2", "qwen2", "llama", "phi3")
# Most tiles an image may be cut into, whatever the checkpoint's max_dynamic_patch: InternVL2 was trained with
# up to 40; more only costs memory. Here, not in image.py, so that record validation and `ptp --help` can read
# it without importing numpy and torch.
MAX_TILES = 40


@dataclass(frozen=True)
class VisionConfig:
    """InternViT."""

    hidden_size: int = 1024  # channel width C
    num_layers: int = 24  # encoder blocks
    num_heads: int = 16  # attention heads (no GQA in the ViT)
    intermediate_size: int = 4096  # MLP width
    image_size: int = 448  # tile side in pixels
    patch_size: int = 14  # 448 / 14 = 32 patches a side
    qkv_bias: bool = True  # InternViT-300M has a bias on the fused qkv; the 6B has none
    qk_norm: bool = False  # RMSNorm on q and k over the full width (InternViT-6B)
    norm_type: str = "layer_norm"  # "layer_norm" | "rms_norm"
    norm_eps: float = 1e-6  # epsilon of every norm in the ViT
    hidden_act: str = "gelu"  # MLP activation

    @property
    def grid(self) -> int:
        """Patches along one side of a tile (32)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches per tile, CLS excluded (1024)."""
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class LLMConfig:
    """A decoder-only backbone: InternLM2, Qwen2, Llama or Phi-3 (all pre-norm, RMSNorm, RoPE, SwiGLU)."""

    arch: str = "internlm2"  # one of LLM_ARCHS; decides only how a checkpoint's weights are laid out
    vocab_size: int = 92553  # rows of the embedding and the LM head
    hidden_size: int = 2048  # model width
    intermediate_size: int = 8192  # SwiGLU width
    num_layers: int = 24  # decoder blocks
    num_heads: int = 16  # query heads
    num_kv_heads: int = 8  # key/value heads (GQA when fewer than num_heads)
    head_dim_override: int | None = None  # a head width not equal to hidden_size / num_heads
    rope_theta: float = 1_000_000.0  # RoPE base
    rope_scaling: dict[str, Any] | None = None  # the checkpoint's rope_scaling (linear, dynamic, longrope/su, llama3)
    max_position_embeddings: int = 32768  # the context length the checkpoint was trained for
    rms_norm_eps: float = 1e-5  # epsilon of every RMSNorm
    qkv_bias: bool = False  # Qwen2 has a bias on q, k and v
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    hidden_act: str = "silu"  # SwiGLU gate activation

    def __post_init__(self) -> None:
        if self.arch not in LLM_ARCHS:
            raise ValueError(f"unknown LLM architecture {self.arch!r}; expected one of {', '.join(LLM_ARCHS)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    @property
    def context_length(self) -> int:
        """Most positions a sequence may use: max_position_embeddings, times the factor under dynamic NTK
        scaling (InternLM2's), which exists to stretch RoPE past the trained length."""
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type")) == "dynamic":
            return int(self.max_position_embeddings * float(scaling.get("factor", 1.0)))
        return self.max_position_embeddings


@dataclass(frozen=True)
class ModelConfig:
    """InternVL: ViT -> pixel shuffle -> mlp1 projector -> LLM, plus what preprocessing and prompts need."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    downsample_ratio: float = 0.5  # pixel shuffle keeps (ratio^2) of the patches: 1024 -> 256
    ps_version: str = "v2"  # pixel-shuffle variant; v1 omits the final transpose
    select_layer: int = -1  # ViT layer whose output feeds the projector
    template: str = "internlm2-chat"  # prompt template name (prompts.py)
    system_message: str | None = None  # None: the template's default
    min_dynamic_patch: int = 1  # fewest tiles
    max_dynamic_patch: int = 12  # most tiles (thumbnail not counted)
    use_thumbnail: bool = True  # append a whole-image tile when there is more than one tile
    name: str = ""  # where the model came from (a path, a hub id, or a shape name), for reports

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens a tile gives the LLM after pixel shuffle (256)."""
        return int(self.vision.num_patches * self.downsample_ratio**2)

    @property
    def shuffle_factor(self) -> int:
        """Patches merged along each side by pixel shuffle (2)."""
        return round(1 / self.downsample_ratio)

    def with_name(self, name: str) -> ModelConfig:
        return replace(self, name=name)


_VIT_300M = VisionConfig()

# Named full-size shapes: real InternVL2 geometry, for random-weight benchmarks (speed does not depend on weights).
SHAPES: dict[str, ModelConfig] = {
    "internvl2-1b": ModelConfig(
        vision=_VIT_300M,
        llm=LLMConfig(
            arch="qwen2", vocab_size=151655, hidden_size=896, intermediate_size=4864, num_layers=24,
            num_heads=14, num_kv_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6, qkv_bias=True,
            tie_word_embeddings=True, max_position_embeddings=32768,
        ),
        template="Hermes-2",
    ),
    "internvl2-2b": ModelConfig(
        vision=_VIT_300M,
        llm=LLMConfig(
            arch="internlm2", vocab_size=92553, hidden_size=2048, intermediate_size=8192, num_layers=24,
            num_heads=16, num_kv_heads=8, rope_theta=1_000_000.0, rms_norm_eps=1e-5,
            max_position_embeddings=32768,
        ),
        template="internlm2-chat",
    ),
    "internvl2-4b": ModelConfig(
        vision=_VIT_300M,
        llm=LLMConfig(
            arch="phi3", vocab_size=32020, hidden_size=3072, intermediate_size=8192, num_layers=32,
            num_heads=32, num_kv_heads=32, rope_theta=10_000.0, rms_norm_eps=1e-5,
            max_position_embeddings=131072,
        ),
        template="phi3-chat",
    ),
    "internvl2-8b": ModelConfig(
        vision=_VIT_300M,
        llm=LLMConfig(
            arch="internlm2", vocab_size=92553, hidden_size=4096, intermediate_size=14336, num_layers=32,
            num_heads=32, num_kv_heads=8, rope_theta=1_000_000.0, rms_norm_eps=1e-5,
            max_position_embeddings=32768,
        ),
        template="internlm2-chat",
    ),
}
