"""Invariants of the customization strategies (strategies.py; paper §2.2-2.6, Table 1), on random
tiny models in fp32: frozen weights bit-identical after optimizer steps, the delta holding exactly
the trainable tensors and reloading bit for bit, a zero-length prefix reproducing the base, prefix
attention equal to attention over explicitly concatenated keys/values, the prefix initialisation
equal to K/V computed by hand from the weights, KV-cached decoding with a prefix equal to the full
forward, a mixed-project batch equal to each project alone, LoRA merged equal to unmerged, and clear
errors on bad input. Table 1 counts and FLOPs: tests/test_flops.py.

PYTHONPATH=. .venv/bin/python -m pytest tests/test_strategies.py -q     (about 20 s on 2 cores)"""

import pytest
import torch
import torch.nn.functional as F

import runs
import strategies
from model import BART, attention_math, config_from_preset

CFG = config_from_preset("tiny", vocab_size=512, dropout=0.0)  # 3 + 3 layers, d 256, 4 heads of 64
OPTS = {
    "custom": {},
    "leo": {},
    "lldb": {},
    "prefix": dict(prefix_len=8),
    "lora": dict(r=4),
    "prefix_mlp": dict(prefix_len=8, mlp_hidden=32, sites=("encoder", "cross")),
}


def base(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return BART(cfg)


def customized(name, seed=0, **extra):
    m = base(seed)
    strategies.apply(m, name.split("_")[0], **{**OPTS[name], **extra})
    return m


def batch(seed=1, B=2, S=9, T=6):
    g = torch.Generator().manual_seed(seed)
    ids, dec = (
        torch.randint(4, CFG.vocab_size, (B, S), generator=g),
        torch.randint(4, CFG.vocab_size, (B, T), generator=g),
    )
    mask = torch.ones_like(ids)
    mask[-1, S - 3 :] = 0  # a right-padded row
    return ids, mask, dec


def train_steps(m, n=2):
    opt = torch.optim.AdamW(strategies.trainable_parameters(m), lr=1e-2)
    ids, mask, dec = batch()
    for _ in range(n):  # two steps: LoRA's A only moves once B is non-zero
        loss = F.cross_entropy(m(ids, mask, dec).flatten(0, 1), dec.roll(-1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("name", list(OPTS))
def test_step_changes_only_trainable_and_delta_reloads_bit_for_bit(name, tmp_path):
    m = customized(name)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train_steps(m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    for n, p in m.named_parameters():
        # frozen: bit-identical; trainable: changed
        assert torch.equal(p, before[n]) != (n in trainable), n
        assert (p.grad is None) == (n not in trainable), n  # frozen weights never get a gradient
    assert m.lm_head.weight is m.model.shared.weight  # the tie survives
    # the delta: exactly the trainable tensors, with the names each strategy should train
    sd = runs.trainable_state_dict(m)
    assert set(sd) == trainable
    expected = {
        "leo": {
            "model.shared.weight",
            "model.encoder.embed_positions.weight",
            "model.decoder.embed_positions.weight",
        },
        "prefix": {"prefix.kv.encoder", "prefix.kv.decoder", "prefix.kv.cross"},
    }.get(name)
    assert expected is None or set(sd) == expected
    if name == "lldb":
        # 8 + 8 + 4 linears, 3 LN
        assert all(k.startswith("model.decoder.layers.2.") for k in sd) and len(sd) == 26
    # q_proj and v_proj in 3 encoder self + 3 decoder self + 3 cross attentions, A and B each
    if name == "lora":
        assert len(sd) == 2 * 2 * 9 and all(k.endswith(("lora_A", "lora_B")) for k in sd)
    path = tmp_path / "delta.safetensors"
    runs.save_trainable(m, path)
    fresh = customized(name)  # same base weights, strategy applied, fresh (random) prefix/LoRA init
    runs.load_trainable(fresh, path)
    m.eval(), fresh.eval()
    ids, mask, dec = batch(seed=5)
    assert torch.equal(fresh(ids, mask, dec), m(ids, mask, dec))


def test_lldb_frozen_trunk_builds_no_autograd_graph():
    m = customized("lldb")
    ids, mask, dec = batch()
    seen = {}
    for i, layer in enumerate(m.model.decoder.layers):
        layer.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out))
    assert m.encode(ids, mask).grad_fn is None  # the encoder ran without recording anything
    m(ids, mask, dec)
    assert seen[0].grad_fn is None and seen[1].grad_fn is None and seen[2].grad_fn is not None


def test_zero_length_prefix_is_the_base_model():
    ids, mask, dec = batch()
    ref = base().eval()(ids, mask, dec)
    m = customized("prefix", prefix_len=0).eval()
    assert torch.equal(m(ids, mask, dec), ref)
    # handing model.py empty K/V explicitly only reorders the matmul's rounding
    empty = {s: torch.zeros(3, 2, 4, 0, 64) for s in strategies.SITES}
    torch.testing.assert_close(base().eval()(ids, mask, dec, prefix=empty), ref, rtol=0, atol=1e-5)


def reference_attention(q, k, v, visible):  # written from the definition, independent of model.py
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    return torch.einsum(
        "bhqk,bhkd->bhqd", s.masked_fill(~visible, float("-inf")).softmax(-1), v.double()
    ).float()


@pytest.mark.parametrize("causal,Lq,Lk", [(False, 5, 9), (True, 7, 7), (True, 1, 6)])
def test_prefix_attention_equals_attention_on_concatenated_keys(causal, Lq, Lk):
    torch.manual_seed(0)
    B, H, P, D = 3, 2, 4, 8
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, D)
    mask = torch.ones(B, Lk, dtype=torch.bool)
    mask[1, -2:] = False
    bank_k, bank_v, index = (
        torch.randn(2, H, P, D),
        torch.randn(2, H, P, D),
        torch.tensor([1, 0, 1]),
    )
    pk, pv = bank_k[index], bank_v[index]  # (B, H, P, D): each row's project
    vis = mask[:, None, None, :] & (
        torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq) if causal else True
    )
    # prefix: always
    vis = torch.cat([torch.ones(B, 1, Lq, P, dtype=torch.bool), vis.expand(B, 1, Lq, Lk)], -1)
    ref = reference_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), vis)
    got = attention_math(
        q, k, v, mask, causal, prefix_k=bank_k, prefix_v=bank_v, prefix_index=index
    )
    cat = attention_math(
        q,
        torch.cat([pk, k], 2),
        torch.cat([pv, v], 2),
        torch.cat(
            [
                torch.ones(B, P, dtype=torch.bool),
                # the plain math path on explicitly concatenated keys and mask
                mask,
            ],
            1,
        ),
        causal,
    )
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, cat, rtol=1e-6, atol=1e-6)


def test_prefix_init_copies_the_frozen_models_projected_keys_and_values():
    # ties by id
    assert strategies.most_frequent_ids([[7, 5, 5, 9, 7, 3], [9, 2]], 3, exclude={2}).tolist() == [
        5,
        7,
        9,
    ]
    assert strategies.most_frequent_ids([[4, 4, 6]], 5).tolist() == [4, 6, 4, 6, 4]
    ids = torch.tensor([11, 12, 13, 14, 15, 16, 17, 18])
    m = customized("prefix", init_ids=ids)
    kv, ref = m.prefix(), base()
    e, d = ref.model.encoder, ref.model.decoder
    pos = torch.arange(8) + 2  # positions 0..P-1, rows offset by 2

    def heads(x):
        return x.view(8, 4, 64).transpose(0, 1)  # (P, C) -> (H, P, hd)

    with torch.no_grad():
        x = e.layernorm_embedding(ref.model.shared.weight[ids] + e.embed_positions.weight[pos])
        torch.testing.assert_close(kv["encoder"][0, 0], heads(e.layers[0].self_attn.k_proj(x)))
        torch.testing.assert_close(kv["encoder"][0, 1], heads(e.layers[0].self_attn.v_proj(x)))
        enc = ref.encode(ids[None], torch.ones(1, 8))[0]
        for l in range(3):
            torch.testing.assert_close(
                kv["cross"][l, 0], heads(d.layers[l].encoder_attn.k_proj(enc))
            )
        y = d.layernorm_embedding(ref.model.shared.weight[ids] + d.embed_positions.weight[pos])
        torch.testing.assert_close(kv["decoder"][0, 1], heads(d.layers[0].self_attn.v_proj(y)))


def test_kv_cached_decoding_with_prefix_equals_full_forward():
    m = customized("prefix", init_ids=torch.arange(20, 28)).eval()
    ids, mask, dec = batch(T=7)
    full = m(ids, mask, dec)
    with torch.no_grad():
        enc, cache = m.encode(ids, mask), [dict() for _ in range(3)]
        steps = torch.cat(
            [m.decode(dec[:, t : t + 1], enc, mask, cache=cache) for t in range(7)], 1
        )
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
    seqs, _ = m.generate(ids, mask, num_beams=1, max_new_tokens=6)  # greedy, KV-cached
    logits = m(ids, mask, seqs[:, :-1])
    assert torch.equal(seqs[:, 1:], logits.argmax(-1))  # each token is the full forward's argmax


def test_mixed_project_batch_generates_what_each_project_generates_alone():
    a = customized("prefix", init_ids=torch.arange(30, 38)).eval()
    b = customized("prefix", init_ids=torch.arange(100, 108)).eval()
    # a random tiny model barely listens to token-derived K/V: make the projects differ
    with torch.no_grad():
        for m, seed in ((a, 1), (b, 2)):
            for t in m.prefix.kv.values():
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)) * 3)
    bank = BART.prefix_bank([a.prefix(), b.prefix()])
    ids, mask, _ = batch()
    kw = dict(num_beams=3, num_return_sequences=3, max_new_tokens=8)
    mixed, mixed_scores = (
        base().eval().generate(ids, mask, prefix=(bank, torch.tensor([0, 1])), **kw)
    )
    for row, model in enumerate([a, b]):
        n = int(mask[row].sum())
        alone, scores = model.generate(ids[row : row + 1, :n], mask[row : row + 1, :n], **kw)
        got = mixed[3 * row : 3 * row + 3]
        assert (
            torch.equal(got[:, : alone.shape[1]], alone)
            and (got[:, alone.shape[1] :] == CFG.pad_token_id).all()
        )
        torch.testing.assert_close(mixed_scores[3 * row : 3 * row + 3], scores)
    # the prefixes matter
    assert not torch.equal(a.generate(ids, mask, **kw)[0], b.generate(ids, mask, **kw)[0])


@pytest.mark.parametrize("name", ["lora", "prefix_mlp"])
def test_merge_for_inference_equals_unmerged(name):
    m = customized(name)
    train_steps(m)  # LoRA's B is zero at init: train first so the merge has something to fold
    m.eval()
    ids, mask, dec = batch(seed=3)
    with torch.no_grad():
        before = m(ids, mask, dec)
        strategies.merge(m)
        torch.testing.assert_close(m(ids, mask, dec), before, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(x, strategies.LoRALinear) for x in m.modules())
    assert not hasattr(m.prefix, "mlp") if m.prefix is not None else True


def test_bad_input_gives_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="valid strategies: custom, leo, lldb, prefix, lora"):
        strategies.apply(base(), "bitfit")
    with pytest.raises(ValueError, match="prefix_len=5000"):
        strategies.apply(base(), "prefix", prefix_len=5000)
    with pytest.raises(ValueError, match="no decoder layers"):
        strategies.apply(base(cfg=config_from_preset("tiny", decoder_layers=0)), "lldb")
    with pytest.raises(ValueError, match="already customized"):
        strategies.apply(customized("leo"), "lldb")
    path = tmp_path / "lldb.safetensors"
    runs.save_trainable(customized("lldb"), path)
    # another strategy, read from the file's metadata
    with pytest.raises(ValueError, match="cannot load onto"):
        runs.load_trainable(customized("leo"), path)
    with pytest.raises(ValueError, match="another strategy"):  # another strategy, a bare state dict
        runs.load_trainable(customized("leo"), runs.trainable_state_dict(customized("lldb")))
    # the same strategy on another model size
    with pytest.raises(ValueError, match="shapes do not match"):
        runs.load_trainable(
            customized("prefix"), runs.trainable_state_dict(customized("prefix", prefix_len=9))
        )
    with pytest.raises(ValueError, match="apply the delta's strategy"):
        runs.load_trainable(base(), path)
