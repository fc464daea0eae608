"""Pre-LLM pruning: PTP's scores against transformers' eager attention, planted-score selections, baselines,
settings, and batch invariance of every registered method through the engine."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_random import CFG, IMG, synthetic_request, tiny_model
from transformers import InternVLVisionConfig, InternVLVisionModel, LlamaConfig, LlamaForCausalLM

from ptp_cli.errors import UsageError
from ptp_cli.models.internvl import InternVLModel, pixel_shuffle
from ptp_cli.pruning import METHODS, PRESETS, Capabilities, PruneConfig, make_method, method_class
from ptp_cli.pruning.base import PruningMethod, VisualContext
from ptp_cli.pruning.baselines import grid_indices
from ptp_cli.pruning.ptp import PTP
from ptp_cli.pruning.scores import instruction_scores, vit_token_scores
from ptp_cli.run.engine import Engine, Request, Result

NTOK = 256


def make_request(tiles: int, question: int, *, seed: int = 0, max_new: int = 4) -> Request:
    """<s> system tokens <img> IMG x 256T </img> question tokens, then 3 template tokens."""
    return synthetic_request(tiles, question, gen_seed=1000 * tiles + question + seed, head=5, gap=1, tail=3,
                             max_new_tokens=max_new, seed=seed)


@pytest.fixture(scope="module")
def model() -> InternVLModel:
    return tiny_model()


class Recorder(PTP):
    """PTP that keeps the VisualContext the engine built (what the scores are checked on)."""

    name = "ptp"  # not registered: a test double

    def select(self, ctx: VisualContext) -> list[torch.Tensor | None]:
        self.ctx = ctx
        return super().select(ctx)


# ---------------------------------------------------------------------------------------------- references


def hf_vision(model: InternVLModel) -> InternVLVisionModel:
    """transformers' InternViT with our weights, eager attention."""
    v = CFG.vision
    cfg = InternVLVisionConfig(
        hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size, image_size=[448, 448], patch_size=[14, 14],
        attention_bias=v.qkv_bias, layer_norm_eps=v.norm_eps, use_mean_pooling=True, attn_implementation="eager",
    )
    hf = InternVLVisionModel(cfg)
    ours = model.vision_model.state_dict()
    c = v.hidden_size
    state = {
        "embeddings.cls_token": ours["embeddings.class_embedding"],
        "embeddings.position_embeddings": ours["embeddings.position_embedding"],
        "embeddings.patch_embeddings.projection.weight": ours["embeddings.patch_embedding.weight"],
        "embeddings.patch_embeddings.projection.bias": ours["embeddings.patch_embedding.bias"],
    }
    for i in range(v.num_layers):
        o, h = f"encoder.layers.{i}.", f"encoder.layer.{i}."
        for name, w, b in zip(("q", "k", "v"), ours[o + "attn.qkv.weight"].split(c), ours[o + "attn.qkv.bias"].split(c),
                              strict=True):
            state[h + f"attention.{name}_proj.weight"] = w
            state[h + f"attention.{name}_proj.bias"] = b
        pairs = {
            "attention.projection_layer": "attn.proj", "layernorm_before": "norm1", "layernorm_after": "norm2",
            "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
        }
        for hn, on in pairs.items():
            state[h + hn + ".weight"] = ours[o + on + ".weight"]
            state[h + hn + ".bias"] = ours[o + on + ".bias"]
        state[h + "lambda_1"] = ours[o + "ls1"]
        state[h + "lambda_2"] = ours[o + "ls2"]
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def hf_llama(model: InternVLModel) -> LlamaForCausalLM:
    """transformers' Llama with our (InternLM2-layout, already q|k|v-fused) LLM weights, eager attention."""
    c = CFG.llm
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=c.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False, attn_implementation="eager",
    )
    hf = LlamaForCausalLM(cfg)
    ours = model.language_model.state_dict()
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    state = {
        "model.embed_tokens.weight": ours["tok_embeddings.weight"],
        "model.norm.weight": ours["norm.weight"],
        "lm_head.weight": ours["output.weight"],
    }
    for i in range(c.num_layers):
        o, h = f"layers.{i}.", f"model.layers.{i}."
        wq, wk, wv = ours[o + "attention.wqkv.weight"].split([q, kv, kv])
        gate, up = ours[o + "feed_forward.w13.weight"].split(c.intermediate_size)
        state |= {
            h + "self_attn.q_proj.weight": wq, h + "self_attn.k_proj.weight": wk, h + "self_attn.v_proj.weight": wv,
            h + "self_attn.o_proj.weight": ours[o + "attention.wo.weight"],
            h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
            h + "mlp.down_proj.weight": ours[o + "feed_forward.w2.weight"],
            h + "input_layernorm.weight": ours[o + "attention_norm.weight"],
            h + "post_attention_layernorm.weight": ours[o + "ffn_norm.weight"],
        }
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def pooled_cls_row(attn: torch.Tensor) -> torch.Tensor:
    """attn [T, H, 1025, 1025] -> [T, 256]: CLS row, mean over heads, CLS key dropped, 2x2 patches summed
    with the PTP.md formula (token 16i+j = patches 32(2i)+2j, +1, 32(2i+1)+2j, +1)."""
    row = attn.mean(1)[:, 0, 1:]  # [T, 1024]
    out = torch.empty(attn.shape[0], 256, dtype=row.dtype)
    for i in range(16):
        for j in range(16):
            p = [32 * (2 * i) + 2 * j, 32 * (2 * i) + 2 * j + 1, 32 * (2 * i + 1) + 2 * j, 32 * (2 * i + 1) + 2 * j + 1]
            out[:, 16 * i + j] = row[:, p].sum(-1)
    return out


# ---------------------------------------------------------------------------------------------- scores


@pytest.fixture(scope="module")
def recorded(model: InternVLModel) -> tuple[list[Request], VisualContext]:
    """A right-padded batch of two samples (3 tiles and a short question; 1 tile and a longer one)."""
    reqs = [make_request(3, 7, max_new=1), make_request(1, 12, max_new=1)]
    method = Recorder(PruneConfig(llm_layer=2), CFG)
    Engine(model, image_token_id=IMG, method=method).generate(reqs)
    return reqs, method.ctx


def test_token_scores_match_transformers_eager(model, recorded):
    reqs, ctx = recorded
    hf = hf_vision(model)
    assert ctx.token_scores is not None
    for r, s, cls in zip(reqs, ctx.token_scores, ctx.cls, strict=True):
        with torch.no_grad():
            out = hf(pixel_values=r.pixel_values, output_attentions=True)
        ref = pooled_cls_row(out.attentions[11])
        # Near-uniform attention (values ~1/256 +-15%): a wrong patch pooling or layer is off by ~1e-2 relative.
        assert ref.std() / ref.mean() > 1e-2
        torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(cls, out.last_hidden_state[:, 0], rtol=1e-4, atol=1e-4)


def test_instruction_scores_match_transformers_eager(model, recorded):
    reqs, ctx = recorded
    hf = hf_llama(model)
    assert ctx.instruction_scores is not None
    for r, c in zip(reqs, ctx.instruction_scores, strict=True):
        with torch.no_grad():
            vis = model.vision_features(r.pixel_values).features.flatten(0, 1)  # [N, D]
            emb = model.language_model.tok_embeddings(torch.tensor(r.ids))  # [S, D]
            v0, v1 = r.image_start, r.image_start + vis.shape[0]
            emb[v0:v1] = vis
            out = hf(inputs_embeds=emb[None], output_attentions=True)
        probs = out.attentions[2][0].mean(0)  # layer M = 2, mean over heads: [S, S]
        ref = probs[r.instruction[0] : r.instruction[1]].amax(0)[v0:v1]  # max over instruction rows
        assert ref.std() / ref.mean() > 1e-2
        torch.testing.assert_close(c, ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("instr_agg", ["max", "mean"])
def test_instruction_scores_in_chunks_of_rows_equal_one_block(model, instr_agg):
    """A chunk of one instruction row at a time (memory linear in the prompt) gives the scores of one block,
    which the test above checks against transformers; padded rows of different lengths in one batch."""
    reqs = [make_request(3, 7, max_new=1), make_request(1, 12, max_new=1)]
    engine = Engine(model, image_token_id=IMG)
    p = engine.build_prompts(reqs, engine.encode_images(reqs).features, [None, None])
    args = (model.language_model, p.x, p.positions, p.valid, p.instruction)
    block = instruction_scores(*args, layer=2, instr_agg=instr_agg, chunk_elements=1 << 40)
    rowwise = instruction_scores(*args, layer=2, instr_agg=instr_agg, chunk_elements=1)
    torch.testing.assert_close(rowwise, block, rtol=1e-6, atol=1e-9)
    assert block[p.visual].std() > 0  # not a degenerate all-equal score


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("head_agg", ["mean", "max"])
def test_vit_token_scores_follow_the_models_token_order(version, head_agg):
    """s of token t sums the patches that pixel_shuffle (the model's own token order) merges into token t."""
    gen = torch.Generator().manual_seed(0)
    attn = torch.rand(2, 3, 32 * 32, generator=gen)  # [T, H, P]
    got = vit_token_scores(attn, head_agg=head_agg, model_cfg=replace(CFG, ps_version=version))
    per_patch = attn.mean(1) if head_agg == "mean" else attn.amax(1)  # [T, P]
    ref = pixel_shuffle(per_patch.view(2, 32, 32, 1), factor=2, version=version).sum(-1).flatten(1)  # [T, 256]
    torch.testing.assert_close(got, ref)
    if version == "v1":  # the orders differ, so the check can fail
        assert not torch.allclose(got, vit_token_scores(attn, head_agg=head_agg, model_cfg=CFG))


# ---------------------------------------------------------------------------------------------- planted selections

# Three tiles of 16 tokens: tile 0 is identical to the thumbnail (cos 1), tile 1 orthogonal (cos 0).
# ratio 0.5: K = 24, thumbnail 8, regions share 16 by softmax([1, 0]) = [0.731, 0.269] -> quotas 11.70, 4.30
# -> floors 11, 4, the spare unit to the larger fraction -> budgets [12, 4, 8]; uniform: [8, 8, 8].
S = torch.stack([
    torch.arange(16.0),  # tile 0: higher index, higher s
    torch.full((16,), 7.0),  # tile 1: constant s -> 0 after normalisation
    (torch.arange(16.0) * 7) % 16,  # thumbnail: the permutation 0,7,14,5,12,3,10,1,8,15,6,13,4,11,2,9
])
C = torch.stack([
    torch.zeros(16).index_fill(0, torch.tensor([3, 5]), 1.0),  # tile 0: c picks tokens 3 and 5
    torch.arange(16.0).flip(0),  # tile 1: lower index, higher c
    torch.full((16,), 0.3),  # thumbnail: constant c
])
THUMB_BY_S = [2, 4, 6, 8, 9, 11, 13, 15]  # where the permutation is >= 8


def planted_ctx() -> VisualContext:
    cls = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    return VisualContext(
        tiles=[3], has_thumbnail=[True], tokens_per_tile=16, cls=[cls], token_scores=[S.clone()],
        instruction_scores=[C.flatten()], seeds=[0],
    )


def flat(*tiles: list[int]) -> list[int]:
    return sorted(16 * t + i for t, idx in enumerate(tiles) for i in idx)


@pytest.mark.parametrize(
    ("alpha", "regions", "expected"),
    [
        # s only: tile 0 its 12 highest; tile 1 all tied -> lowest 4; thumbnail its 8 highest.
        (0.0, True, flat(list(range(4, 16)), [0, 1, 2, 3], THUMB_BY_S)),
        # c only: tile 0 tokens 3, 5 then ties at 0 -> lowest indices; tile 1 lowest 4; thumbnail tied -> 0..7.
        (1.0, True, flat([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [0, 1, 2, 3], list(range(8)))),
        # 0.5 s/15 + 0.5 [t in {3, 5}]: 5 (.67), 3 (.6), then 15, 14, ... by s.
        (0.5, True, flat([3, 5, *range(6, 16)], [0, 1, 2, 3], THUMB_BY_S)),
        (0.5, False, flat([3, 5, *range(10, 16)], list(range(8)), THUMB_BY_S)),
        (0.0, False, flat(list(range(8, 16)), list(range(8)), THUMB_BY_S)),
    ],
)
def test_planted_selection(alpha, regions, expected):
    method = make_method(PruneConfig(alpha=alpha, region_budgets=regions), CFG)
    (kept,) = method.select(planted_ctx())
    assert kept is not None
    assert kept.tolist() == expected


def test_without_token_score_ranks_by_c_alone():
    method = make_method(PruneConfig(alpha=0.5, use_token_score=False), CFG)
    assert method.vit_score_layer() is None
    (kept,) = method.select(replace(planted_ctx(), token_scores=None))
    assert kept is not None
    assert kept.tolist() == flat([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [0, 1, 2, 3], list(range(8)))


def test_ties_go_to_lower_index():
    ctx = VisualContext(
        tiles=[1], has_thumbnail=[False], tokens_per_tile=256, cls=[torch.ones(1, 4)],
        token_scores=[torch.full((1, 256), 0.5)], instruction_scores=[torch.full((256,), 0.25)], seeds=[0],
    )
    (kept,) = make_method(PruneConfig(ratio=0.75), CFG).select(ctx)
    assert kept is not None
    assert kept.tolist() == list(range(64))


def test_hooks_skip_unused_scores():
    def hooks(**kw) -> tuple[int | None, int | None]:
        m = make_method(PruneConfig(**kw), CFG)
        return m.vit_score_layer(), m.probe_layer()

    assert hooks() == (11, 1)
    assert hooks(alpha=0.0) == (11, None)  # no probe at all
    assert hooks(alpha=1.0) == (None, 1)
    assert hooks(use_token_score=False) == (None, 1)
    assert hooks(ratio=0.0) == (None, None)
    assert hooks(vit_layer=3, llm_layer=2, head_agg="max") == (3, 2)
    assert make_method(PruneConfig(head_agg="max", instr_agg="mean"), CFG).instruction_aggregation() == "mean"


# ---------------------------------------------------------------------------------------------- baselines


def test_grid_indices_exact_distinct_and_regular():
    for b in range(257):
        g = grid_indices(b, 16)
        assert g.numel() == b
        assert g.unique().numel() == b
        assert b == 0 or (g.min() >= 0 and g.max() < 256)
    stride2 = sorted(16 * r + c for r in range(1, 16, 2) for c in range(1, 16, 2))
    assert grid_indices(64, 16).tolist() == stride2
    assert grid_indices(256, 16).tolist() == list(range(256))
    assert grid_indices(1, 16).tolist() == [16 * 8 + 8]  # the centre


def test_spatial_uses_ptp_budgets_on_a_grid():
    (kept,) = make_method(PruneConfig(method="spatial"), CFG).select(planted_ctx())
    assert kept is not None
    per_tile = [[k % 16 for k in kept.tolist() if k // 16 == t] for t in range(3)]
    assert [len(t) for t in per_tile] == [12, 4, 8]
    assert per_tile[1] == [5, 7, 13, 15]  # 4 of a 4x4 grid: the stride-2 grid


def test_random_is_seeded_per_sample():
    method = make_method(PruneConfig(method="random", ratio=0.5), CFG)

    def ctx(tiles: list[int], seeds: list[int]) -> VisualContext:
        return VisualContext(
            tiles=tiles, has_thumbnail=[t > 1 for t in tiles], tokens_per_tile=256,
            cls=[torch.zeros(t, 4) for t in tiles], token_scores=None, instruction_scores=None, seeds=seeds,
        )

    a, b, c = method.select(ctx([3, 3, 3], [5, 5, 6]))
    assert a is not None and b is not None and c is not None
    assert a.numel() == 384 and a.unique().numel() == 384 and a.tolist() == sorted(a.tolist())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    _, alone = method.select(ctx([1, 3], [9, 5]))  # other company in the batch: same choice
    assert alone is not None and torch.equal(alone, a)


# ---------------------------------------------------------------------------------------------- settings


def test_validate_names_the_option():
    cases = {
        "--ratio": dict(ratio=1.0),
        "--alpha": dict(alpha=1.5),
        "--vit-layer": dict(vit_layer=12),
        "--llm-layer": dict(llm_layer=4),
        "--tau": dict(tau=0.0),
        "--head-agg": dict(head_agg="sum"),
        "--instr-agg": dict(instr_agg="min"),
        "--fastv-layer": dict(method="fastv", fastv_layer=4),
        "--vtw-layer": dict(method="vtw", vtw_layer=0),
        "--pdrop-layers": dict(method="pdrop", pdrop_layers=(2, 1)),
        "--pdrop-keep": dict(method="pdrop", pdrop_keep=0.0),
        "--no-token-score": dict(alpha=0.0, use_token_score=False),
    }
    for option, kwargs in cases.items():  # building the config checks the ranges; check_layers the depth
        with pytest.raises(UsageError, match=option):
            PruneConfig(**kwargs).check_layers(CFG)
    with pytest.raises(UsageError, match=r"--method.*fastv, none, pdrop, pool, ptp, random, spatial, tiles, vtw"):
        PruneConfig(method="bogus")
    # Layer options are checked only for the method that uses them: a 1-layer LLM has no FastV layer.
    one_layer = replace(CFG, llm=replace(CFG.llm, num_layers=1))
    assert PruneConfig(method="ptp", llm_layer=0).check_layers(one_layer).method == "ptp"
    with pytest.raises(UsageError, match="--fastv-layer"):
        PruneConfig(method="fastv").check_layers(one_layer)


def test_presets_and_factory():
    assert PRESETS["default"] == PruneConfig()
    assert (PRESETS["ocr"].alpha, PRESETS["ocr"].vit_layer) == (0.2, 2)
    assert PRESETS["scene"].alpha == 0.8
    for name in METHODS:
        m = make_method(PruneConfig(method=name), CFG)
        assert type(m) is method_class(name) and m.name == name
        assert m.settings()["method"] == name
    assert sorted(make_method(PruneConfig(method="pdrop"), CFG).drop_layers()) == [0, 1, 2]  # after 1, 2, 3 of 4
    assert make_method(PruneConfig(method="vtw"), CFG).drop_layers() == {1}  # after layer 2 of 4
    assert make_method(PruneConfig(method="fastv"), CFG).drop_layers() == {1}  # K_f = 2


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_class_declares_what_its_catalog_entry_says(name: str) -> None:
    """The registry (torch-free) and the classes agree, and a capability is declared exactly when the class
    has the hook it describes."""
    cls = method_class(name)  # raises TypeError on a mismatch
    caps = Capabilities.of(cls)
    assert caps == METHODS[name].capabilities
    overrides = {hook: getattr(cls, hook) is not getattr(PruningMethod, hook)
                 for hook in ("vit_score_layer", "probe_layer", "after_layer", "drop_layers")}
    assert caps.needs_vit_scores == overrides["vit_score_layer"]
    assert caps.needs_probe == overrides["probe_layer"]
    assert caps.prunes_in_llm == overrides["after_layer"] == overrides["drop_layers"]
    assert caps.uses_ratio == ("ratio" in make_method(PruneConfig(method=name), CFG).settings())


def test_a_class_that_disagrees_with_its_entry_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from ptp_cli.pruning import inllm

    monkeypatch.setattr(inllm.VTW, "prunes_in_llm", False)
    with pytest.raises(TypeError, match="does not match"):
        method_class("vtw")


# ---------------------------------------------------------------------------------------------- engine


def run(model: InternVLModel, method: PruningMethod | None, reqs: list[Request]) -> list[Result]:
    return Engine(model, image_token_id=IMG, method=method).generate(reqs)


def test_ratio_zero_is_exactly_unpruned(model):
    reqs = [make_request(2, 6, max_new=4)]
    (base,) = run(model, None, reqs)
    (none,) = run(model, make_method(PruneConfig(method="none"), CFG), reqs)
    assert none == replace(base, timing=none.timing)
    for name in ("ptp", "random", "spatial", "fastv"):
        (r,) = run(model, make_method(PruneConfig(method=name, ratio=0.0), CFG), reqs)
        assert r.tokens == base.tokens and r.logprobs == base.logprobs, name
        assert r.kept == list(range(512)) and r.layer_lengths == base.layer_lengths, name
    (pruned,) = run(model, make_method(PruneConfig(ratio=0.5), CFG), reqs)
    assert pruned.logprobs != base.logprobs  # pruning does change the outputs: the comparison can fail


# Every registered method, and PTP with alpha chosen per sample (--alpha auto).
BATCH_CONFIGS = {name: PruneConfig(method=name) for name in METHODS} | {"ptp-auto": PruneConfig(alpha="auto")}


@pytest.mark.parametrize("name", sorted(BATCH_CONFIGS))
def test_batch_equals_each_sample_alone(model, name):
    reqs = [make_request(1, 4, seed=1), make_request(3, 9, seed=2), make_request(7, 6, seed=3)]
    method = make_method(BATCH_CONFIGS[name], CFG)
    batch = run(model, method, reqs)
    for r, b in zip(reqs, batch, strict=True):
        (alone,) = run(model, method, [r])
        assert b.kept == alone.kept
        # PTP's alpha and signals: the scores differ by float32 rounding between batch shapes (~1e-7), nothing more.
        assert b.pruning == pytest.approx(alone.pruning, rel=1e-5, abs=1e-9)
        assert b.tokens == alone.tokens
        assert b.layer_lengths == alone.layer_lengths
        assert b.flops == alone.flops
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(alone.logprobs), rtol=0, atol=1e-4)
