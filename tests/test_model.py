"""model.py against the outside reference, HF transformers' BartForConditionalGeneration holding
the same weights. Tiny random configs, CPU, fp32. Run: `make test` or `.venv/bin/python -m pytest
tests/test_model.py -q`."""

import argparse
import os

import pytest
import torch

from model import BART, BARTConfig, beam_search, config_from_preset, greedy

transformers = pytest.importorskip("transformers")
TINY = dict(
    vocab_size=99,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    dropout=0.0,
)


def make_pair(tmp_path, eos_bias=0.0, **over):
    """Our random BART with a non-zero final_logits_bias, saved by us and loaded by transformers."""
    torch.manual_seed(0)
    ours = BART(BARTConfig(**{**TINY, **over})).eval()
    with torch.no_grad():
        ours.final_logits_bias.normal_(std=0.5)
        # makes </s> likely, so beams finish at different lengths
        ours.final_logits_bias[0, 2] += eos_bias
    ours.save_pretrained(tmp_path / "ours")
    hf = transformers.BartForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    return ours, hf


def batch(B=3, S=11, T=7, V=99, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 7:], mask[2, 3:] = 0, 0  # ragged right padding
    ids[mask == 0] = 1
    dec = torch.randint(3, V, (B, T), generator=g)
    dec[:, 0] = 2
    return ids, mask, dec


def left_pad(ids, mask):
    """Move every row's real tokens to the right end."""
    out_ids, out_mask = torch.full_like(ids, 1), torch.zeros_like(mask)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        out_ids[b, ids.shape[1] - n :], out_mask[b, ids.shape[1] - n :] = ids[b, :n], 1
    return out_ids, out_mask


def test_logits_and_loss_match_hf_right_and_left_padding(tmp_path):
    """Logits (right- and left-padded sources) and the loss equal HF's on right-padded input."""
    ours, hf = make_pair(tmp_path)
    ids, mask, dec = batch()
    ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert (ours(ids, mask, dec) - ref).abs().max() < 1e-5
    # HF's positions are not padding-aware; ours are, so left padding agrees
    lids, lmask = left_pad(ids, mask)
    assert (ours(lids, lmask, dec) - ref).abs().max() < 1e-5
    labels = torch.cat([dec[:, 1:], torch.full((3, 1), 2)], 1)
    labels[2, 4:] = -100
    loss = torch.nn.functional.cross_entropy(
        ours(ids, mask, dec).flatten(0, 1), labels.flatten(), ignore_index=-100
    )
    hf_loss = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels).loss
    assert abs(loss.item() - hf_loss.item()) < 1e-5


def test_sdpa_equals_math(tmp_path):
    """attn_impl='sdpa' gives the math path's logits."""
    ours, _ = make_pair(tmp_path)
    ids, mask, dec = batch()
    ref = ours(ids, mask, dec)
    ours.config.attn_impl = "sdpa"
    assert (ours(ids, mask, dec) - ref).abs().max() < 1e-5


def test_hf_written_directory_loads_and_ours_loads_in_hf(tmp_path):
    """A directory written by transformers' save_pretrained loads into ours with equal logits
    (and vice versa)."""
    torch.manual_seed(3)
    cfg = transformers.BartConfig(**{k: v for k, v in TINY.items()}, activation_function="gelu")
    hf = transformers.BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        hf.final_logits_bias.normal_()
    hf.save_pretrained(tmp_path / "hf")
    ours = BART.from_pretrained(tmp_path / "hf")
    ids, mask, dec = batch()
    assert (
        ours(ids, mask, dec) - hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    ).abs().max() < 1e-5
    # a parent folder that does not exist yet is created
    ours.save_pretrained(tmp_path / "new" / "back")
    hf2 = transformers.BartForConditionalGeneration.from_pretrained(
        tmp_path / "new" / "back"
    ).eval()
    assert (
        hf2(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits - ours(ids, mask, dec)
    ).abs().max() < 1e-5


def fairseq_state(ours, legacy):
    """Build a fairseq-layout state dict from our weights (../docs/checkpoints.md §2 table, read
    in reverse)."""
    sd = {}
    for k, v in ours.state_dict().items():
        if k in ("lm_head.weight", "final_logits_bias") or ".embed_tokens." in k:
            continue
        sd[k[len("model.") :].replace("shared.weight", "encoder.embed_tokens.weight")] = v.clone()
    sd["decoder.embed_tokens.weight"] = sd["encoder.embed_tokens.weight"].clone()
    sd["encoder.version"] = sd["decoder.version"] = torch.tensor([3.0])
    if not legacy:
        sd["decoder.output_projection.weight"] = sd["encoder.embed_tokens.weight"].clone()
        return sd
    names = {
        "encoder": ["self_attn_layer_norm", "final_layer_norm"],
        "decoder": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    }
    for k in list(sd):
        if k.endswith(".q_proj.weight") or k.endswith(".q_proj.bias"):
            stem, kind = k.rsplit(".q_proj.", 1)
            sd[f"{stem}.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"{stem}.{p}_proj.{kind}") for p in "qkv"]
            )
        for side, lns in names.items():
            for i, ln in enumerate(lns):
                if k.startswith(side + ".") and f".{ln}." in k and k in sd:
                    sd[k.replace(f".{ln}.", f".layer_norms.{i}.")] = sd.pop(k)
    return sd


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("variant", ["args", "cfg"])
@pytest.mark.parametrize("V", [50264, 50265])
def test_fairseq_checkpoints_load(tmp_path, legacy, variant, V):
    """fairseq .pt (modern/legacy layout, args Namespace or cfg dict, V = 50264/50265) gives HF's
    logits."""
    ours, hf = make_pair(
        tmp_path, vocab_size=V, d_model=16, encoder_attention_heads=2, decoder_attention_heads=2
    )
    with torch.no_grad():
        # fairseq has no final_logits_bias: converted models have zeros
        ours.final_logits_bias.zero_()
        hf.final_logits_bias.zero_()
    a = dict(
        encoder_embed_dim=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_embed_dim=64,
        decoder_ffn_embed_dim=64,
        no_scale_embedding=True,
        dropout=0.1,
        attention_dropout=0.0,
        activation_dropout=0.0,
        arch="bart_large",
    )
    ckpt = {"model": fairseq_state(ours, legacy), "optimizer_history": [{"num_updates": 3}]}
    ckpt.update(
        {"args": argparse.Namespace(**a)}
        if variant == "args"
        else {"args": None, "cfg": {"model": a}}
    )
    torch.save(ckpt, tmp_path / "ck.pt")
    loaded = BART.from_pretrained(tmp_path / "ck.pt")
    assert loaded.config.vocab_size == V
    ids, mask, dec = batch(V=V)
    assert (
        loaded(ids, mask, dec)
        - hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    ).abs().max() < 1e-5


def test_pickled_callable_is_refused(tmp_path):
    """A checkpoint carrying a pickled callable is refused, never executed."""
    torch.save({"model": {}, "args": None, "hook": os.getcwd}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        BART.from_pretrained(tmp_path / "evil.pt")


def test_kv_cache_equals_full_forward(tmp_path):
    """Step-by-step KV-cached decoding gives the full teacher-forced forward's logits at every
    step."""
    ours, _ = make_pair(tmp_path)
    ids, mask, dec = batch()
    full = ours(ids, mask, dec)
    enc, cache = ours.encode(ids, mask), [dict() for _ in range(2)]
    steps = [ours.decode(dec[:, t : t + 1], enc, mask, cache=cache) for t in range(dec.shape[1])]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


@pytest.mark.parametrize(
    "beams,early_stopping,length_penalty,eos_bias",
    [
        (1, True, 1.0, 4.0),
        (5, True, 1.0, 4.0),
        (5, False, 1.0, 4.0),
        (5, "never", 2.0, 4.0),
        (5, False, 0.5, 4.0),
        # the last: 8 of its 10 steps finish no beam (generate skips their bookkeeping), 2 do
        (5, False, 0.5, 1.0),
    ],
)
def test_generate_matches_hf(tmp_path, beams, early_stopping, length_penalty, eos_bias):
    """Greedy and 5-beam search (5 returned) give HF generate's sequences and length-normalized
    scores, with each of HF's stopping rules (early_stopping True / False / "never") and length
    penalties: beams finish at different steps here (a bias on </s>), so the finished sets, the
    stopping test and the inputs leaving the batch all run."""
    ours, hf = make_pair(tmp_path, eos_bias=eos_bias)
    ids, mask, _ = batch()
    seqs, scores = ours.generate(
        ids,
        mask,
        num_beams=beams,
        num_return_sequences=beams,
        max_new_tokens=10,
        early_stopping=early_stopping,
        length_penalty=length_penalty,
    )
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        num_beams=beams,
        num_return_sequences=beams,
        max_new_tokens=10,
        do_sample=False,
        early_stopping=early_stopping,
        length_penalty=length_penalty,
        min_length=0,
        no_repeat_ngram_size=0,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert (seqs == 2).sum(1).gt(1).any(), (
        "fixture should finish some beams with </s> before the limit"
    )
    assert torch.equal(seqs, out.sequences)
    if beams > 1:
        assert (scores - out.sequences_scores).abs().max() < 1e-5


def test_generate_with_forced_bos_matches_hf(tmp_path):
    """A checkpoint whose config forces <s> first (forced_bos_token_id): beam 5 gives HF
    generate's sequences and scores (HF sets every log-probability of the first step to -inf but
    <s>'s; ours does it to the logits)."""
    ours, hf = make_pair(tmp_path, eos_bias=4.0, forced_bos_token_id=0)
    ids, mask, _ = batch()
    seqs, scores = ours.generate(ids, mask, num_beams=5, num_return_sequences=5, max_new_tokens=10)
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        num_beams=5,
        num_return_sequences=5,
        max_new_tokens=10,
        do_sample=False,
        early_stopping=True,
        length_penalty=1.0,
        min_length=0,
        no_repeat_ngram_size=0,
        forced_bos_token_id=0,
        forced_eos_token_id=None,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert (seqs[:, 1] == 0).all(), (
        "every sequence should open with <s> after the decoder start token"
    )
    assert torch.equal(seqs, out.sequences)
    assert (scores - out.sequences_scores).abs().max() < 1e-5


@pytest.mark.parametrize(
    "early_stopping,length_penalty,eos_bias,forced_bos,new_tokens",
    [
        (True, 1.0, 4.0, None, 10),
        (False, 0.5, 4.0, None, 10),
        ("never", -1.0, 4.0, None, 10),
        (True, 1.0, 0.0, 0, 10),
        (True, 1.0, 4.0, None, 0),
    ],
)
def test_greedy_is_beam_search_with_one_beam(
    early_stopping, length_penalty, eos_bias, forced_bos, new_tokens
):
    """generate(num_beams=1) runs model.greedy, the reference loop: the same sequences and scores,
    bit for bit, as beam search with one beam (inputs finishing at different steps leave both
    batches alike), under every stopping rule where one beam stops at </s>."""
    torch.manual_seed(0)
    ours = BART(BARTConfig(**TINY, forced_bos_token_id=forced_bos)).eval()
    with torch.no_grad():
        # large weights: the inputs' outputs differ, and so do their lengths
        for p in ours.parameters():
            if p.dim() == 2:
                p.normal_(std=0.4)
        ours.final_logits_bias[0, 2] += eos_bias
    ids, mask, _ = batch(B=5)
    seqs, scores = greedy(ours, ids, mask, new_tokens, length_penalty)
    one_beam = beam_search(ours, ids, mask, 1, 1, new_tokens, length_penalty, early_stopping)
    assert torch.equal(seqs, one_beam[0]) and torch.equal(scores, one_beam[1])
    kw = dict(
        max_new_tokens=new_tokens, length_penalty=length_penalty, early_stopping=early_stopping
    )
    assert torch.equal(ours.generate(ids, mask, **kw)[0], seqs)
    if new_tokens and eos_bias:
        lengths = (seqs != 1).sum(1)
        assert lengths.min() < lengths.max(), "inputs should finish at different steps"


@pytest.mark.parametrize("name,count", [("bart-large", 406_291_456), ("bart-base", 139_420_416)])
def test_preset_parameter_counts(name, count):
    """Presets built on the meta device have the published parameter counts
    (../docs/checkpoints.md §10)."""
    with torch.device("meta"):
        assert BART(config_from_preset(name)).num_parameters() == count


def test_malformed_inputs_raise_clear_errors(tmp_path):
    """Missing key, wrong shape, unknown format, empty/truncated file, vocabulary mismatch: named
    errors."""
    ours, _ = make_pair(tmp_path)
    from safetensors.torch import load_file, save_file

    st = tmp_path / "ours" / "model.safetensors"
    sd = load_file(st)
    for name, edit, exc, msg in [
        (
            "missing",
            lambda d: d.pop("model.encoder.layers.1.fc1.weight"),
            KeyError,
            "encoder.layers.1.fc1.weight",
        ),
        (
            "shape",
            lambda d: d.__setitem__("model.decoder.layers.0.fc2.bias", torch.zeros(5)),
            ValueError,
            r"\(5,\)",
        ),
    ]:
        bad = dict(sd)
        edit(bad)
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(
            (tmp_path / "ours" / "config.json").read_text()
        )
        save_file(bad, tmp_path / name / "model.safetensors")
        with pytest.raises(exc, match=msg):
            BART.from_pretrained(tmp_path / name)
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "config.json").write_text((tmp_path / "ours" / "config.json").read_text())
    (tmp_path / "trunc" / "model.safetensors").write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ValueError, match="trunc.*truncated"):
        BART.from_pretrained(tmp_path / "trunc")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pt: empty file"):
        BART.from_pretrained(tmp_path / "empty.pt")
    torch.save({"weights": 1}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="odd.pt: unknown checkpoint format"):
        BART.from_pretrained(tmp_path / "odd.pt")
    (tmp_path / "nodir").mkdir()
    with pytest.raises(ValueError, match="nodir: not a checkpoint"):
        BART.from_pretrained(tmp_path / "nodir")
    with pytest.raises(ValueError, match="99 entries but the tokenizer has 100"):
        BART.from_pretrained(tmp_path / "ours", expect_vocab_size=100)
