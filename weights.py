"""The checkpoint files model.py reads (paper §2.1: AthenaTest's BART): Hugging Face directories
(config.json + model.safetensors | pytorch_model.bin) and fairseq `.pt` checkpoints (modern and
legacy layouts, `args` or `cfg`), mapped key for key onto model.py's HF module names, with what is
refused and why (docs/checkpoints.md §1-3). Pickles are read with weights_only=True; nothing but
argparse.Namespace is allowed unless the caller trusts the file.

Each reader returns (config values, tensors): a dict of the values it found (HF `BartConfig`
names) and the state dict. This file knows nothing of the model; model.py builds its config from
the dict:

    from model import BART
    # BART.from_pretrained calls read_hf_dir or read_fairseq
    model = BART.from_pretrained("path/to/hf_dir_or_fairseq.pt")

Tests: tests/test_model.py (directories written by either side load in the other; fairseq
layouts; refusals)."""

import argparse
import hashlib
import json
import os

import torch

# the three names of the one shared embedding in an HF checkpoint (model.shared.weight is the
# tensor itself)
TIED = ("lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")

# the legacy fairseq layer-norm lists, by position
FAIRSEQ_LN = {
    "encoder": ["self_attn_layer_norm", "final_layer_norm"],
    "decoder": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
}


def config_from_tensors(sd, path, **known):
    """The config values: `known` (from the file's config) with V, d, the layer counts and the
    position rows read from the tensors, which `known` must agree with. None values dropped."""
    if "model.shared.weight" not in sd:
        raise KeyError(f"{path}: missing tensor 'model.shared.weight' (the token embedding)")

    def count(prefix):
        return len({k.split(".")[3] for k in sd if k.startswith(prefix)})

    V, d = sd["model.shared.weight"].shape
    shapes = {
        "vocab_size": V,
        "d_model": d,
        "encoder_layers": count("model.encoder.layers."),
        "decoder_layers": count("model.decoder.layers."),
    }
    pos = sd.get("model.encoder.embed_positions.weight")
    if pos is not None:
        shapes["max_position_embeddings"] = pos.shape[0] - 2
    for k, v in shapes.items():
        # the vocabulary may be padded: the tensors decide
        if k == "vocab_size" or known.get(k) is None:
            continue
        if known[k] != v:
            raise ValueError(f"{path}: config says {k}={known[k]} but the tensors give {v}")
    values = {**known, **shapes}
    return {k: v for k, v in values.items() if v is not None}


def verify_sha256sums(path):
    """A checkpoint folder that carries SHA256SUMS (the shipped base does; `sha256sum -c
    SHA256SUMS` checks it by hand): every file it lists must be there with that sha256. A
    mismatch is an error naming the file."""
    sums = os.path.join(path, "SHA256SUMS")
    if not os.path.isfile(sums):
        return
    lines = open(sums, encoding="utf-8").read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{sums}:{n}: not a line of sha256sum's format ('<sha256>  <file>')")
        want = parts[0]
        name = parts[1].strip().lstrip("*")
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            raise FileNotFoundError(
                f"{f}: listed in {sums} but missing; restore the folder (for the shipped base: "
                f"`git checkout -- {path}`)"
            )
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != want:
            raise ValueError(
                f"{f}: sha256 {h.hexdigest()[:16]}... is not the {want[:16]}... that {sums} "
                f"records: the file was changed or cut short; restore it (for the shipped "
                f"base: `git checkout -- {path}`) or retrain with `make base`"
            )


def read_hf_json(cfg_file, path):
    if not os.path.isfile(cfg_file):
        raise ValueError(
            f"{path}: not a checkpoint: an HF directory needs config.json (and model.safetensors "
            f"or pytorch_model.bin); a fairseq checkpoint is a .pt file"
        )
    try:
        with open(cfg_file) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None


def read_hf_tensors(path):
    """model.safetensors, else pytorch_model.bin, with their HF names."""
    st = os.path.join(path, "model.safetensors")
    binf = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        try:
            return load_file(st)
        # safetensors raises its own error types for empty or truncated files
        except Exception as e:
            raise ValueError(
                f"{st}: cannot read safetensors file ({e}); is it truncated?"
            ) from None
    if os.path.isfile(binf):
        return _safe_torch_load(binf, trusted=False)
    raise FileNotFoundError(
        f"{path}: no model.safetensors or pytorch_model.bin next to config.json"
    )


def read_hf_dir(path):
    """(config values, tensors) of an HF directory."""
    verify_sha256sums(path)
    cfg_file = os.path.join(path, "config.json")
    hf = read_hf_json(cfg_file, path)
    raw = read_hf_tensors(path)
    sd = {}
    for k, v in raw.items():
        # fairseq leftovers in old hub files
        if k.endswith(".version") or k.endswith("_float_tensor"):
            continue
        k = k.removeprefix("model.")
        if k not in ("lm_head.weight", "final_logits_bias"):
            k = "model." + k
        sd[k] = v
    if "model.shared.weight" not in sd and "model.encoder.embed_tokens.weight" in sd:
        # some files keep only the tied copy
        sd["model.shared.weight"] = sd["model.encoder.embed_tokens.weight"]
    _check_tied(sd, path)
    if "final_logits_bias" not in sd:
        sd["final_logits_bias"] = _zero_logits_bias(sd)
    # attn_impl is a run-time choice, not the file's
    known = {k: v for k, v in hf.items() if k != "attn_impl"}
    if hf.get("activation_function", "gelu") != "gelu":
        raise ValueError(
            f"{cfg_file}: activation_function {hf['activation_function']!r} is not supported "
            f"(BART uses gelu)"
        )
    return config_from_tensors(sd, path, **known), sd


def _zero_logits_bias(sd):
    """(1, V) zeros, as HF initialises final_logits_bias; None when the embedding is missing (the
    config check then names it)."""
    if "model.shared.weight" not in sd:
        return None
    return torch.zeros(1, sd["model.shared.weight"].shape[0])


def _check_tied(sd, path):
    """Tied copies (lm_head, both embed_tokens) may be present or absent; when present they must
    equal shared."""
    for k in TIED:
        if k not in sd:
            continue
        t = sd.pop(k)
        if "model.shared.weight" in sd and not torch.equal(t, sd["model.shared.weight"]):
            raise ValueError(
                f"{path}: {k!r} differs from the shared embedding; untied embeddings are not "
                f"supported"
            )


def _safe_torch_load(path, trusted):
    """torch.load with weights_only=True and argparse.Namespace allow-listed: no arbitrary code
    is unpickled."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file")
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            first = str(e).splitlines()[0][:200]
            raise ValueError(
                f"{path}: refusing to unpickle a non-data object ({first}); "
                f"pass trusted=True only for a file you trust"
            ) from None
        raise ValueError(
            f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e)[:200]}); is it truncated?"
        ) from None


def fairseq_args(ckpt):
    """The model's settings of a fairseq checkpoint as a dict: `args` (a Namespace), or in newer
    checkpoints cfg['model'] (a dict, or a Namespace for legacy archs)."""
    args = ckpt.get("args")
    if args is None and isinstance(ckpt.get("cfg"), dict):
        args = ckpt["cfg"].get("model")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args or {})


def fairseq_name(k):
    """A fairseq tensor name -> model.py's HF name."""
    if ".layer_norms." in k:
        # legacy layer-norm list -> named layer norms
        stem, rest = k.split(".layer_norms.")
        idx, kind = rest.split(".")
        k = f"{stem}.{FAIRSEQ_LN[stem.split('.')[0]][int(idx)]}.{kind}"
    if k.startswith("encoder.embed_tokens"):
        k = k.replace("encoder.embed_tokens", "shared")
    return "model." + k


def fairseq_tensors(model_sd):
    """The HF-named state dict of a fairseq checkpoint's `model`."""
    sd = {}
    for k, v in model_sd.items():
        if k.endswith(".version") or k.endswith("_float_tensor"):
            continue
        if k.startswith("classification_heads."):
            continue
        if k == "decoder.output_projection.weight":
            # tied (fairseq >= 0.10 stores it); checked against shared below
            sd["lm_head.weight"] = v
            continue
        if ".in_proj_" in k:
            # legacy fused q, k, v projection: split into thirds in that order
            stem, kind = k.split(".in_proj_")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                sd[f"model.{stem}.{name}.{kind}"] = part
            continue
        sd[fairseq_name(k)] = v
    return sd


def read_fairseq(path, trusted):
    """(config values, tensors) of a fairseq checkpoint."""
    ckpt = _safe_torch_load(path, trusted)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(
            f"{path}: unknown checkpoint format: expected a fairseq checkpoint (a dict with "
            f"'model' and 'args' or 'cfg') or an HF directory"
        )
    a = fairseq_args(ckpt)
    sd = fairseq_tensors(ckpt["model"])
    _check_tied(sd, path)
    sd["final_logits_bias"] = _zero_logits_bias(sd)
    known = {
        "d_model": a.get("encoder_embed_dim"),
        "encoder_layers": a.get("encoder_layers"),
        "decoder_layers": a.get("decoder_layers"),
        "encoder_attention_heads": a.get("encoder_attention_heads"),
        "decoder_attention_heads": a.get("decoder_attention_heads"),
        "encoder_ffn_dim": a.get("encoder_ffn_embed_dim"),
        "decoder_ffn_dim": a.get("decoder_ffn_embed_dim"),
        "scale_embedding": not a.get("no_scale_embedding", True),
        "dropout": a.get("dropout"),
        "attention_dropout": a.get("attention_dropout"),
        "activation_dropout": a.get("activation_dropout"),
    }
    if a.get("encoder_normalize_before") or a.get("decoder_normalize_before"):
        raise ValueError(f"{path}: a pre-LN (normalize_before) model is not BART; not supported")
    return config_from_tensors(sd, path, **known), sd
