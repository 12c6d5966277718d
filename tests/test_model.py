"""FoveatedVLM and FoveatedEncoder behaviour on tiny random-weight models (no downloads)."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model

from conftest import SMOLLM2_GGUF, TINY_DINO, TINY_LLM, DinoCounter, tiny_model_kwargs
from conftest import rand_frames as frames
from conftest import rand_ids as ids
from encoder import FoveatedEncoder
import config
from model import MODES, FoveatedVLM, ModelSettings
from checkpoint import CONFIG_NAME, WEIGHTS_NAME

ATOL = 1e-5


# ---------------------------------------------------------------- encoder
@pytest.mark.parametrize("size", [(56, 56), (28, 42), (70, 56)])
def test_patch_path_equals_dinov2(size):
    torch.manual_seed(0)
    dino = Dinov2Model(Dinov2Config(**{k: v for k, v in TINY_DINO.items() if k != "model_type"})).eval()
    x = torch.randn(3, 3, *size)
    reference = dino(x, output_hidden_states=True)
    kv = FoveatedEncoder(dino, query_dim=24).encode_patches(x)  # deep query: every layer's keys and values
    assert len(kv) == 3 and len(kv.keys) == TINY_DINO["num_hidden_layers"] and kv.features is None
    for layer, hidden, k, v in zip(dino.encoder.layer, reference.hidden_states, kv.keys, kv.values):
        h = layer.norm1(hidden)  # the layer's input, as transformers computed it
        assert (k.transpose(1, 2).flatten(2) - layer.attention.k_proj(h)).abs().max() < ATOL
        assert (v.transpose(1, 2).flatten(2) - layer.attention.v_proj(h)).abs().max() < ATOL
    shallow = FoveatedEncoder(dino, query_dim=24, deep_query=False).encode_patches(x)
    assert (shallow.features - reference.last_hidden_state).abs().max() < ATOL


def test_frame_size_must_divide_by_patch():
    enc = FoveatedEncoder(Dinov2Model(Dinov2Config(**{k: v for k, v in TINY_DINO.items() if k != "model_type"})), 24)
    with pytest.raises(ValueError, match="patch size 14"):
        enc.encode_patches(torch.randn(1, 3, 50, 56))


def test_grouped_queries_equal_one_query_per_frame(tiny_model):
    enc = tiny_model.encoder
    kv = enc.encode_patches(torch.randn(3, 3, 56, 56))
    q = torch.randn(5, 24)
    idx = torch.tensor([0, 2, 2, 1, 2])
    z, maps = enc.query_attend(q, kv, idx, return_attention=True)
    assert (z - enc.query_attend(q, kv, idx)).abs().max() < ATOL  # sdpa path == explicit-weights path
    assert torch.allclose(maps[0].sum(-1), torch.ones(5, 2), atol=1e-5)
    for m, f in enumerate(idx.tolist()):
        assert (enc.query_attend(q[m:m + 1], kv.select(torch.tensor([f])))[0] - z[m]).abs().max() < ATOL


def test_query_changes_the_token(tiny_model):
    kv = tiny_model.encoder.encode_patches(torch.randn(1, 3, 56, 56))
    a = tiny_model.encoder.query_attend(torch.randn(1, 24), kv)
    b = tiny_model.encoder.query_attend(torch.randn(1, 24), kv)
    assert (a - b).abs().max() > 1e-3


# ---------------------------------------------------------------- loss and modes
def test_loss_is_masked_next_token_ce(tiny_model):
    x, t = frames(1, 2), ids(1, 6)
    loss_mask = torch.tensor([[1, 1, 0, 1, 1, 0]])
    out = tiny_model(x, t, torch.ones_like(t), loss_mask=loss_mask, mode="coarse_only")
    logp = torch.log_softmax(out["logits"][0, :-1], -1)
    targets = [i for i in range(1, 6) if loss_mask[0, i]]  # token 0 is never a target
    manual = -torch.stack([logp[i - 1, t[0, i]] for i in targets]).mean()
    assert abs(out["loss"].item() - manual.item()) < 1e-5
    lean = tiny_model(x, t, torch.ones_like(t), loss_mask=loss_mask, mode="coarse_only", return_logits=False)
    assert lean["logits"] is None and abs(lean["loss"].item() - manual.item()) < 1e-5


def test_modes_differ_and_bad_mode_is_rejected(tiny_model):
    x, t = frames(1, 3), ids(1, 5)
    losses = {m: tiny_model(x, t, mode=m)["loss"].item() for m in MODES}
    assert len({round(v, 6) for v in losses.values()}) == 3
    encoded = tiny_model.encode(x)
    with DinoCounter(tiny_model) as dino:
        for m in MODES:  # one DINO pass shared by every mode (validation in several modes)
            assert tiny_model(x, t, mode=m, encoded=encoded)["loss"].item() == pytest.approx(losses[m], abs=1e-6)
    assert dino.frames == 0
    with pytest.raises(ValueError, match="mode must be one of"):
        tiny_model(x, t, mode="fine")


@pytest.mark.parametrize("mode", MODES)
def test_padded_batch_matches_each_sample_alone(tiny_model, mode):
    # sample 0: 3 frames, 6 tokens; sample 1: 1 frame, 4 tokens (left-padded); sample 2: text only.
    B, T, S = 3, 3, 6
    x, t = frames(B, T), ids(B, S)
    fmask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    amask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    x[~fmask] = 1e3  # padded frames hold garbage: nothing may read it
    batched = tiny_model(x, t, amask, frame_mask=fmask, mode=mode)["logits"]
    for b in range(B):
        keep = amask[b].bool()
        alone = tiny_model(x[b:b + 1, fmask[b]], t[b:b + 1, keep], mode=mode)["logits"][0]
        assert (batched[b, keep] - alone).abs().max() < ATOL, f"sample {b}"


def test_padded_frames_cost_no_dino_work(tiny_model):
    fmask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    with DinoCounter(tiny_model) as dino:
        tiny_model(frames(2, 4), ids(2, 5), frame_mask=fmask)
    assert (dino.calls, dino.frames) == (1, 3)


def test_text_only_batch_is_the_llm_alone(tiny_model):
    t = ids(2, 5)
    logits = tiny_model.llm(t).logits  # [B, S, V]: the LLM without fVLM around it
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), t[:, 1:].flatten())
    for mode in MODES:
        out = tiny_model(torch.zeros(2, 0, 3, 56, 56), t, mode=mode)
        assert abs(out["loss"].item() - reference.item()) < ATOL and (out["logits"] - logits).abs().max() < ATOL


def test_replicated_images_encode_once_with_the_same_loss(tiny_model):
    img = frames(2, 1)
    x = img.expand(2, 8, 3, 56, 56)  # two images replicated to 8 frames, no copy
    t = ids(2, 6)
    with DinoCounter(tiny_model) as dino:
        deduped = tiny_model(x, t)["loss"]
    assert dino.frames == 2
    # the same step with every frame encoded on its own (as without dedup)
    every = (tiny_model.encoder.encode_patches(x.flatten(0, 1)), torch.arange(16), torch.tensor([8, 8]))
    full = tiny_model(x, t, encoded=every)["loss"]
    assert abs(deduped.item() - full.item()) < ATOL


def test_fine_loss_reaches_the_query_path():
    torch.manual_seed(0)
    model = FoveatedVLM(**tiny_model_kwargs())
    model(frames(2, 3), ids(2, 6), mode="coarse_fine")["loss"].backward()
    for name in ("q_init", "q_static", "llm_to_query.weight", "encoder.query_input_proj.weight",
                 "encoder.output_proj.weight", "dino_to_llm.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_lambda_coarse_adds_the_coarse_loss():
    torch.manual_seed(0)
    base = FoveatedVLM(**tiny_model_kwargs()).eval()
    x, t = frames(1, 3), ids(1, 6)
    fine = base(x, t, mode="coarse_fine")["loss"]
    coarse = base(x, t, mode="coarse_only")["loss"]
    base.settings.lambda_coarse = 0.5
    both = base(x, t, mode="coarse_fine")["loss"]
    assert abs(both.item() - (fine + 0.5 * coarse).item()) < ATOL


def test_shallow_query_is_one_attention_over_dinos_final_features():
    """deep_query=False (the ablation): the query reads transformers' own DINOv2 output through the last layer's
    projections once, instead of going through every layer."""
    torch.manual_seed(0)
    enc = FoveatedVLM(**tiny_model_kwargs(deep_query=False)).eval().encoder
    x, q = torch.randn(2, 3, 56, 56), torch.randn(2, 24)
    features = enc.dino(x).last_hidden_state  # [2, 1+P, D]
    attn, hd = enc.dino.encoder.layer[-1].attention, TINY_DINO["hidden_size"] // TINY_DINO["num_attention_heads"]
    heads = lambda h: h.unflatten(-1, (-1, hd)).transpose(1, 2)  # [N, L, D] -> [N, heads, L, hd]
    w = torch.softmax(heads(attn.q_proj(enc.query_input_proj(q))[:, None]) @ heads(attn.k_proj(features)).mT
                      / hd**0.5, -1)  # [2, heads, 1, 1+P]
    manual = enc.output_proj(attn.o_proj((w @ heads(attn.v_proj(features))).transpose(1, 2).flatten(2)))[:, 0]
    assert (enc.query_attend(q, enc.encode_patches(x)) - manual).abs().max() < ATOL


@pytest.mark.parametrize("mode, unused", [
    ("coarse_fine", set()), ("coarse_only", {"q_init", "llm_to_query.weight", "llm_to_query.bias"}),
    ("autoregressive", {"q_static"})])
def test_gradient_checkpointing_gives_the_same_gradients(mode, unused):
    """Every parameter the mode reads gets a gradient, the same with checkpointing; 3 frames, so that the
    autoregressive queries read a KV cache (which transformers' checkpointed layers would drop)."""
    torch.manual_seed(0)
    a = FoveatedVLM(**tiny_model_kwargs())
    b = FoveatedVLM(**tiny_model_kwargs())
    b.load_state_dict(a.state_dict())
    b.enable_gradient_checkpointing()
    x, t = frames(1, 3), ids(1, 5)
    grads = []
    for m in (a, b):
        m.train()
        m(x, t, mode=mode)["loss"].backward()
        grads.append({name: p.grad for name, p in m.named_parameters()})
    for g in grads:  # DINO's mask_token serves masked-image pretraining only
        assert {name for name, grad in g.items() if grad is None} == unused | {"encoder.dino.embeddings.mask_token"}
    for name, grad in grads[0].items():
        assert grad is None or torch.allclose(grad, grads[1][name], rtol=0, atol=1e-6), name


def test_param_groups_and_freezing(tiny_model):
    groups = tiny_model.param_groups()
    counts = tiny_model.count_parameters()
    assert sum(p.numel() for p in groups["dino"]) == counts["dino"]
    assert counts["total"] == sum(p.numel() for p in tiny_model.parameters())
    assert {id(p) for p in groups["connector"]} >= {id(tiny_model.q_init), id(tiny_model.dino_to_llm.weight)}
    tiny_model.set_trainable(frozen=["dino"])
    assert tiny_model.param_groups()["dino"] == [] and tiny_model.param_groups()["llm"]


# ---------------------------------------------------------------- DPO
def test_dpo_logps_match_forward_and_encode_once(tiny_model):
    x = frames(2, 3)
    fmask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    chosen, rejected = ids(2, 7, seed=1), ids(2, 5, seed=2)
    cm, rm = torch.ones_like(chosen), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    clm, rlm = torch.zeros_like(chosen), torch.zeros_like(rejected)
    clm[:, 4:] = 1
    rlm[:, 2:] = 1
    for mode in MODES:
        with DinoCounter(tiny_model) as dino:
            out = tiny_model.forward_dpo(x, fmask, chosen, cm, clm, rejected, rm, rlm, mode=mode)
        assert (dino.calls, dino.frames) == (1, 5)  # one encoding for both answers
        for name, t, m, lm in (("chosen", chosen, cm, clm), ("rejected", rejected, rm, rlm)):
            logits = tiny_model(x, t, m, frame_mask=fmask, mode=mode)["logits"]
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, t[:, 1:, None])[..., 0]
            ref = (logp * (lm * m)[:, 1:]).sum(1)
            assert torch.allclose(out[f"{name}_logps"], ref, atol=1e-4), (mode, name)


# ---------------------------------------------------------------- generation and scoring
def greedy_by_forward(model, x, prompt, n, mode):
    seq = prompt
    for _ in range(n):
        nxt = model(x, seq, mode=mode)["logits"][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq[:, prompt.shape[1]:]


@pytest.mark.parametrize("mode", MODES)
def test_cached_generation_equals_uncached_argmax(tiny_model, mode):
    x, prompt = frames(1, 3), ids(1, 4)
    out = tiny_model.generate(x, prompt, max_new_tokens=6, mode=mode)
    assert torch.equal(out, greedy_by_forward(tiny_model, x, prompt, 6, mode))


def test_batched_generation_with_different_lengths(tiny_model):
    x = frames(2, 3)
    fmask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    prompt, amask = ids(2, 6), torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    out = tiny_model.generate(x, prompt, amask, fmask, max_new_tokens=5)
    for b in range(2):
        alone = tiny_model.generate(x[b:b + 1, fmask[b]], prompt[b:b + 1, amask[b].bool()], max_new_tokens=5)
        assert torch.equal(out[b], alone[0])


def test_generation_stops_at_eos(tiny_model):
    x, prompt = frames(1, 2), ids(1, 4)
    first = tiny_model.generate(x, prompt, max_new_tokens=3)[0, 0].item()
    out = tiny_model.generate(x, prompt, max_new_tokens=10, eos_token_id=first)
    assert out.shape == (1, 1)
    sampled = tiny_model.generate(x, prompt, max_new_tokens=4, do_sample=True, temperature=0.7, top_p=0.9)
    assert sampled.shape == (1, 4)


def test_attention_maps_are_distributions(tiny_model):
    fmask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    maps = tiny_model.attention_maps(frames(1, 3), fmask)
    for name in ("coarse", "fine"):
        m = maps[name]  # [L, B, T, heads, 1+P]
        assert m.shape == (2, 1, 3, 2, 17)
        assert torch.allclose(m[:, 0, :2].sum(-1), torch.ones(2, 2, 2), atol=1e-5)
        assert m[:, 0, 2].abs().sum() == 0
    assert (maps["coarse"][:, 0, 1] - maps["fine"][:, 0, 1]).abs().max() > 1e-6  # the LLM moved the query


# ---------------------------------------------------------------- checkpoints
def outputs(model):
    x, t = frames(1, 2), ids(1, 5)
    return torch.stack([model(x, t, mode=m)["logits"] for m in MODES])


def test_save_and_from_pretrained_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    loaded = FoveatedVLM.from_pretrained(str(tmp_path))
    assert loaded.settings.query_dim == 24 and loaded.llm.config.hidden_size == TINY_LLM["hidden_size"]
    assert torch.equal(outputs(loaded), outputs(tiny_model))


def test_settings_are_defined_once_and_saved(tiny_model, tmp_path):
    cfg = config.ModelConfig(llm_config=dict(TINY_LLM), dino_config=dict(TINY_DINO), query_dim=24, visual_scale=0.5,
                             lambda_coarse=0.25, mode="coarse_only", freeze_dino=True)  # training fields too
    built = FoveatedVLM.from_config(cfg)
    assert built.settings == ModelSettings.of(cfg) and built.settings.visual_scale == 0.5
    built.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["fvlm"] == {"llm": None, "dino": None, "query_dim": 24, "visual_scale": 0.5, "deep_query": True,
                             "lambda_coarse": 0.25}
    assert FoveatedVLM.from_pretrained(str(tmp_path)).settings.lambda_coarse == 0.25
    # config.json as first written (the constructor's names) still loads; an unknown setting names the file
    saved["fvlm"] = {"llm_name": None, "dino_name": None, "query_dim": 24, "visual_scale": 0.5, "deep_query": True,
                     "lambda_coarse": 0.25}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(saved))
    legacy = FoveatedVLM.from_pretrained(str(tmp_path))
    assert (legacy.settings.query_dim, legacy.settings.lambda_coarse) == (24, 0.25)
    assert torch.equal(outputs(legacy), outputs(built))
    saved["fvlm"]["query_size"] = 24
    (tmp_path / CONFIG_NAME).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"config.json: unknown model setting\(s\) \['query_size'\]"):
        FoveatedVLM.from_pretrained(str(tmp_path))


def test_loads_original_transformers4_names(tiny_model, tmp_path):
    from safetensors.torch import save_file

    old = {}
    for key, value in tiny_model.state_dict().items():
        key = key.replace(".attention.q_proj.", ".attention.attention.query.")
        key = key.replace(".attention.k_proj.", ".attention.attention.key.")
        key = key.replace(".attention.v_proj.", ".attention.attention.value.")
        key = key.replace(".attention.o_proj.", ".attention.output.dense.")
        old[key] = value.clone()
    assert any("attention.attention.query" in k for k in old)
    for with_head in (True, False):
        sd = dict(old)
        if not with_head:
            sd.pop("llm.lm_head.weight")
        save_file(sd, str(tmp_path / WEIGHTS_NAME))  # a published checkpoint: weights only, no config
        loaded = FoveatedVLM.from_pretrained(str(tmp_path), **tiny_model_kwargs())
        assert torch.equal(outputs(loaded), outputs(tiny_model))


def test_loads_the_originals_training_checkpoint(tiny_model, tmp_path):
    """The original's train.py saves {"model_state_dict", "optimizer_state_dict", "step", ...} with torch.save,
    under torch.compile's `_orig_mod` prefixes at times: read with weights_only=True; unsafe ones refused."""
    state = {k.replace("llm.", "llm._orig_mod.", 1): v.clone() for k, v in tiny_model.state_dict().items()}
    path = tmp_path / "best.pt"
    torch.save({"model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []}, "step": 7,
                "metric_value": 1.5, "timestamp": "2026-01-01T00:00:00"}, path)
    loaded = FoveatedVLM.from_pretrained(str(path), **tiny_model_kwargs())
    assert torch.equal(outputs(loaded), outputs(tiny_model))
    with pytest.raises(ValueError, match=r"holds weights only.*widths \(LLM 64, DINO 32\)"):
        FoveatedVLM.from_pretrained(str(path))  # tiny widths: no published backbone to build
    with pytest.raises(ValueError, match=f"(?s){path}: Error.*size mismatch for q_init"):
        FoveatedVLM.from_pretrained(str(path), **tiny_model_kwargs(query_dim=16))
    torch.save({"model_state_dict": state, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(ValueError, match=f"{path}: refused as unsafe"):
        FoveatedVLM.from_pretrained(str(path), **tiny_model_kwargs())


def test_weights_alone_name_the_published_backbones():
    from checkpoint import weights_settings

    state = {"llm.model.embed_tokens.weight": torch.empty(0, 2048),
             "encoder.dino.embeddings.cls_token": torch.empty(1, 1, 384), "q_init": torch.empty(1, 192)}
    assert weights_settings(state, "w") == {"llm_name": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
                                            "dino_name": "facebook/dinov2-small", "query_dim": 192}


def test_mismatched_checkpoint_is_an_error(tiny_model):
    sd = tiny_model.state_dict()
    sd.pop("q_init")
    with pytest.raises(RuntimeError, match="q_init"):
        tiny_model.load_state_dict(sd)


@pytest.mark.slow
def test_real_smollm2_gguf_answers_a_question_it_knows(tokenizer):
    """The real SmolLM2-135M-Instruct weights inside FoveatedVLM, with a random tiny DINO: greedy decoding answers
    as the LLM does, without frames and after two frames whose tokens are scaled to zero (they still take
    positions and attention, so a wrong position, mask or cache would change the answer). Measured: the same
    answer at visual_scale 0.14 too; the closest greedy step's top-2 logit gap is 0.38 (the first token)."""
    torch.manual_seed(0)
    model = FoveatedVLM(SMOLLM2_GGUF, None, dino_config=dict(TINY_DINO), query_dim=24).eval()
    assert model.llm.config.hidden_size == 576 and model.llm.config.num_hidden_layers == 30
    question, answer = "What is the capital of France?", "The capital of France is Paris."
    out = model.generate(torch.zeros(1, 0, 3, 56, 56), question, max_new_tokens=12, tokenizer=tokenizer)
    assert out[0, -1] == tokenizer.eos_token_id and tokenizer.decode(out[0], skip_special_tokens=True) == answer
    model.settings.visual_scale = 0.0
    out = model.generate(frames(1, 2), question, max_new_tokens=12, tokenizer=tokenizer)  # autoregressive
    assert out[0, -1] == tokenizer.eos_token_id and tokenizer.decode(out[0], skip_special_tokens=True) == answer
