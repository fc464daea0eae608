"""One way from an input record to an engine ``Request``: image -> tiles -> prompt ids -> spans -> request.

``InputProcessor`` is used by ``Pipeline`` (``ptp infer``), by ``ptp bench`` (synthetic requests) and by
anything else that builds requests. Its steps are separate methods, so a caller can time or reuse one of
them (``bench`` tiles one image once and builds every request of a batch on those tiles):

- ``tiling_for``: the run's tiling with a record's ``max_tiles``/``min_tiles`` overrides;
- ``load_tiles``: read the image and cut it into tiles (``[T, 3, 448, 448]``);
- ``encode``: the prompt ids, where the image placeholders start, the question's span and the stop ids.
  This step is delegated to a ``chat_template.Prompter`` (a built-in template, a -hf checkpoint's own chat
  template, or synthetic ids for benchmarks), each a drop-in replacement for the others;
- ``request``: the ``Request``, with the record's generation overrides over the run's defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ptp_cli.errors import PromptTooLongError, RecordError
from ptp_cli.io.records import Record
from ptp_cli.preprocess.image import DEFAULT_MAX_PIXELS, TilingOptions, load_image, record_tiling
from ptp_cli.preprocess.retile import fewer_tiles
from ptp_cli.run.engine import Request
from ptp_cli.text.chat_template import Prompter
from ptp_cli.text.prompts import PromptIds

Overrides = Mapping[str, int | float]


@dataclass(frozen=True)
class RequestDefaults:
    """What every request gets unless its record overrides it."""

    max_new_tokens: int = 64  # generation length cap (record override: max_new_tokens)
    temperature: float = 0.0  # 0: greedy (record override: temperature)
    seed: int = 0  # sampling and random-pruning seed (record override: seed)
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)


class InputProcessor:
    """Records to engine requests for one model. Thread-safe: it holds no mutable state."""

    def __init__(
        self,
        *,
        encoder: Prompter,
        tiling: TilingOptions,
        tokens_per_tile: int,
        defaults: RequestDefaults = RequestDefaults(),
        pixel_dtype: torch.dtype = torch.float32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_positions: int | None = None,
        max_prompt_tokens: int | None = None,
        retile_ratio: float | None = None,
    ) -> None:
        self.encoder = encoder  # the prompt step (chat_template.Prompter: a template, the checkpoint's own, ...)
        self.tiling = tiling  # the run's tiling; records may override max_tiles/min_tiles
        self.tokens_per_tile = tokens_per_tile  # visual placeholders per tile (256 for InternVL2)
        self.defaults = defaults
        # Tiles are kept in the model's dtype: the ViT casts to it anyway, so no number changes, but host
        # memory and the host-to-device copy halve in bf16/fp16.
        self.pixel_dtype = pixel_dtype
        self.max_pixels = max_pixels  # decompression-bomb guard
        self.max_positions = max_positions  # the model's positions: prompt + generated tokens must fit
        self.max_prompt_tokens = max_prompt_tokens  # the user's cap on a prompt's tokens (None: no cap)
        # The ``tiles`` baseline's ratio: images get the fewer tiles that fit its budget (``retile``); None: no
        self.retile_ratio = retile_ratio

    # ------------------------------------------------------------------------------------------ steps

    def tiling_for(self, overrides: Overrides) -> TilingOptions:
        """The run's tiling with a record's overrides; a bad combination is the record's error."""
        return record_tiling(self.tiling, overrides)

    def load_tiles(self, image: Path, tiling: TilingOptions) -> torch.Tensor:
        """Read ``image`` and tile it: ``[T, 3, S, S]`` in ``pixel_dtype``. Raises ``ImageError``."""
        return self.load_retiled(image, tiling)[0]

    def load_retiled(self, image: Path, tiling: TilingOptions) -> tuple[torch.Tensor, int | None]:
        """``load_tiles``, on fewer tiles with ``retile_ratio``: (tiles, the tile count before, or None)."""
        picture = load_image(image, max_pixels=self.max_pixels)
        full = None
        if self.retile_ratio is not None:
            tiling, full = fewer_tiles(tiling, *picture.size, ratio=self.retile_ratio,
                                       tokens_per_tile=self.tokens_per_tile)
        return tiling.preprocess(picture).to(self.pixel_dtype), full

    def encode(self, question: str, *, num_image_tokens: int) -> PromptIds:
        """The prompt step, done by ``self.encoder``; a question that makes no valid prompt is a RecordError."""
        try:
            return self.encoder.encode(question=question, num_image_tokens=num_image_tokens)
        except RecordError:
            raise
        except ValueError as e:
            raise RecordError(str(e), kind="prompt_error") from None

    def check_length(self, prompt_tokens: int, *, num_image_tokens: int, max_new_tokens: int) -> None:
        """Refuse a prompt the model cannot take, before any compute: it would fail (or exhaust memory) in the
        engine, in a batch of innocent records. Raises ``PromptTooLongError`` with the numbers."""
        details = {"prompt_tokens": prompt_tokens, "image_tokens": num_image_tokens}
        what = f"the prompt has {prompt_tokens} tokens ({num_image_tokens} of them image tokens)"
        cap = self.max_prompt_tokens
        if cap is not None and prompt_tokens > cap:
            raise PromptTooLongError(f"{what}, more than --max-prompt-tokens {cap}", details={**details, "limit": cap})
        room = self.max_positions
        if room is not None and prompt_tokens + max_new_tokens > room:
            raise PromptTooLongError(
                f"{what}; with max_new_tokens {max_new_tokens} it needs {prompt_tokens + max_new_tokens} positions, "
                f"more than the model's {room}",
                details={**details, "max_new_tokens": max_new_tokens, "limit": room},
            )

    def request(
        self, question: str, pixels: torch.Tensor, *, tiling: TilingOptions | None = None,
        overrides: Overrides | None = None,
    ) -> Request:
        """A request on ``pixels`` (tiles cut with ``tiling``, default the run's) for ``question``."""
        ov = overrides or {}
        tiling = tiling or self.tiling
        n_tiles = int(pixels.shape[0])  # pixels: [T, 3, S, S]
        prompt = self.encode(question, num_image_tokens=n_tiles * self.tokens_per_tile)
        d = self.defaults
        max_new = int(ov.get("max_new_tokens") or d.max_new_tokens)
        self.check_length(len(prompt.ids), num_image_tokens=prompt.num_image_tokens, max_new_tokens=max_new)
        return Request(
            ids=prompt.ids,
            pixel_values=pixels,
            image_start=prompt.image_start,
            instruction=(prompt.instruction_start, prompt.instruction_end),
            stop_ids=prompt.stop_ids,
            max_new_tokens=max_new,
            temperature=float(ov["temperature"]) if ov.get("temperature") is not None else d.temperature,
            seed=int(ov["seed"]) if ov.get("seed") is not None else d.seed,
            has_thumbnail=n_tiles > 1 and tiling.use_thumbnail,
            ignore_eos=d.ignore_eos,
        )

    # ------------------------------------------------------------------------------------------ all of it

    def process(self, record: Record) -> Request:
        """Load, tile and encode one record. Raises ``RecordError`` (or a subclass) for bad input only."""
        tiling = self.tiling_for(record.overrides)
        pixels, full = self.load_retiled(record.image, tiling)
        request = self.request(record.question, pixels, tiling=tiling, overrides=record.overrides)
        request.full_tiles = full
        return request
