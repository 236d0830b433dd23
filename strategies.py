"""The paper's customization strategies (§2.2-2.6, Figure 1, Table 1): custom (every weight), leo
(shared embedding tied with the output layer + both position tables), lldb (last decoder block),
prefix (200 trainable keys and values per attention site, Li & Liang 2021), and lora (not in the
paper: the usual cheap baseline). TABLE below says what each trains and its defaults.

    strategies.apply(model, "lldb")   # prints "trainable X / total Y (Z%)" (Table 1)
    opt = torch.optim.AdamW(strategies.trainable_parameters(model), lr=3e-5)
    runs.save_trainable(model, "best.safetensors")   # the delta
    runs.load_trainable(base_with_the_same_strategy, "best.safetensors")

Frozen weights get requires_grad=False: no gradient, no optimizer state, no autograd graph below
the first trainable tensor (lldb's trunk). Counts, storage, FLOPs: `python flops.py --model
bart-large`. Tests: `pytest tests/test_strategies.py`. Spec: docs/checkpoints.md §7 (prefix), §10
(counts)."""

import json
import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# the strategy table: what each strategy trains and its options' defaults, stated once here
# (flops.py, train.py and serve.py read it)

# the attention sites a prefix can hold: encoder self-attention, decoder self-attention, decoder
# cross-attention
SITES = ("encoder", "decoder", "cross")
# the linear layers a LoRA can wrap (and flops.py counts)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class Spec:
    """One strategy: what it trains, in words (README's table), and its options with their
    defaults (the keyword arguments of its function below)."""

    trains: str
    defaults: dict


TABLE = {
    "custom": Spec("every weight", {}),
    "leo": Spec(
        "the shared embedding (tied with the output layer) and both position tables; options: "
        "both layernorm_embedding, the final logits bias",
        {"layernorm": False, "logits_bias": False},
    ),
    "lldb": Spec("the last decoder block, with its three layer norms", {}),
    "prefix": Spec(
        "prefix_len trainable key/value vectors in every attention site of `sites` (Li & Liang "
        "2021; mlp_hidden > 0: their training-time MLP)",
        # the paper's prefix length P (§2.5)
        {"prefix_len": 200, "sites": SITES, "mlp_hidden": 0, "init_ids": None},
    ),
    "lora": Spec(
        "rank-r adapters (scaled alpha / r) on the `targets` linear layers of every layer",
        # PEFT's defaults for BART (docs/checkpoints.md §8)
        {"r": 8, "alpha": 16, "targets": ("q_proj", "v_proj")},
    ),
}

# the defaults by name, for the command lines' defaults and the signatures below
PREFIX_LEN = TABLE["prefix"].defaults["prefix_len"]
LORA_RANK = TABLE["lora"].defaults["r"]
LORA_ALPHA = TABLE["lora"].defaults["alpha"]
LORA_DEFAULT = TABLE["lora"].defaults["targets"]


def with_defaults(name, options):
    """The options of strategy `name` with the table's default for each one not given."""
    return {**TABLE[name].defaults, **options}


def _begin(model, name, **options):
    """Freeze everything and record the strategy (json-normalised: it round-trips through a
    file's metadata)."""
    if getattr(model, "strategy", None) is not None:
        raise ValueError(
            f"the model is already customized with {model.strategy['name']!r}: start from a "
            f"fresh base"
        )
    model.requires_grad_(False)
    model.strategy = {"name": name, "options": json.loads(json.dumps(options))}


def _report(model):
    n = sum(p.numel() for p in trainable_parameters(model))
    total = model.num_parameters()
    print(f"{model.strategy['name']}: trainable {n:,} / total {total:,} ({100 * n / total:.2f}%)")
    return model


def trainable_parameters(model):
    """Hand only these to the optimizer: frozen weights get no Adam moments."""
    return [p for p in model.parameters() if p.requires_grad]


def custom(model):
    _begin(model, "custom")
    model.requires_grad_(True)
    return _report(model)


def leo(model, layernorm=False, logits_bias=False):
    """Definition C (docs/checkpoints.md §10): the shared embedding (= both embed_tokens =
    lm_head) + both position tables. `layernorm` adds both layernorm_embedding (E); `logits_bias`
    turns the final_logits_bias buffer into a trainable Parameter (D). Both stay frozen by
    default (the bias is zero in every converted fairseq model). The other readings of the
    paper's "53M" are in `python flops.py` (Table 1)."""
    _begin(model, "leo", layernorm=layernorm, logits_bias=logits_bias)
    m = model.model
    trained = [m.shared, m.encoder.embed_positions, m.decoder.embed_positions]
    if layernorm:
        trained += [m.encoder.layernorm_embedding, m.decoder.layernorm_embedding]
    for mod in trained:
        mod.requires_grad_(True)
    if logits_bias:
        # nn.Module.__setattr__ turns the buffer into a parameter of the same name
        model.final_logits_bias = nn.Parameter(model.final_logits_bias.detach().clone())
    return _report(model)


def lldb(model):
    layers = model.model.decoder.layers
    if len(layers) == 0:
        raise ValueError(
            "lldb trains the last decoder block, but this model has no decoder layers "
            "(decoder_layers=0)"
        )
    _begin(model, "lldb")
    # self-attention, cross-attention, FFN and the three layer norms
    layers[-1].requires_grad_(True)
    return _report(model)


def site_shape(config, site, prefix_len):
    """(n_layers, 2, H, P, head_dim) of one site kind's prefix."""
    if site == "encoder":
        L = config.encoder_layers
        H = config.encoder_attention_heads
    else:
        L = config.decoder_layers
        H = config.decoder_attention_heads
    return (L, 2, H, prefix_len, config.d_model // H)


class Prefix(nn.Module):
    """{site: (n_layers, 2, H, P, head_dim)}: P keys and values per layer, already projected,
    which model.py puts in front of each attention's keys/values (never masked, no positions).
    mlp_hidden > 0: Li & Liang's training-time reparametrization, a (P, d) table -> Linear ->
    tanh -> Linear; merge() folds it into the plain table."""

    def __init__(self, config, prefix_len, sites, mlp_hidden=0):
        super().__init__()
        self.shapes = {s: site_shape(config, s, prefix_len) for s in sites}
        self.config = config
        self.prefix_len = prefix_len
        self.sites = tuple(sites)
        if mlp_hidden:
            self.wte = nn.Parameter(torch.randn(prefix_len, config.d_model) * 0.02)
            # all sites' K, V of a token
            n_out = sum(L * two * H * hd for L, two, H, P, hd in self.shapes.values())
            self.mlp = nn.Sequential(
                nn.Linear(config.d_model, mlp_hidden), nn.Tanh(), nn.Linear(mlp_hidden, n_out)
            )
        else:
            # small random init, used when no token ids are given (e.g. before loading a saved
            # delta)
            kv = {s: nn.Parameter(torch.randn(sh) * 0.02) for s, sh in self.shapes.items()}
            self.kv = nn.ParameterDict(kv)

    def forward(self):
        # A zero-length prefix is no prefix: concatenating an empty K/V changes the keys' memory
        # layout and so the matmul's rounding; returning no sites keeps P = 0 bit-identical to the
        # base model.
        if self.prefix_len == 0:
            return {}
        if not hasattr(self, "mlp"):
            return dict(self.kv)
        # (P, sum over sites of L * 2 * H * hd)
        flat = self.mlp(self.wte)
        out = {}
        start = 0
        for s, (L, two, H, P, hd) in self.shapes.items():
            n = L * two * H * hd
            # -> (L, 2, H, P, hd)
            out[s] = flat[:, start : start + n].reshape(P, L, two, H, hd).permute(1, 2, 3, 0, 4)
            start += n
        return out


@torch.no_grad()
def kv_of_tokens(model, ids):
    """docs/checkpoints.md §7: run the ids (positions 0..P-1) through the frozen encoder and,
    teacher-forced on the same ids, the frozen decoder; return {site: (L, 2, H, P, hd)}: encoder
    layer l's K/V of its input states, decoder layer l's self-attention K/V, and its
    cross-attention K/V of the encoder's final output."""
    was_training = model.training
    # no dropout in the copied activations
    model.eval()
    # (1, P)
    ids = ids.to(model.model.shared.weight.device)[None]
    mask = torch.ones_like(ids, dtype=torch.bool)
    encoder = model.model.encoder
    decoder = model.model.decoder
    # (P, C): the encoder layers take the real tokens packed
    x = encoder.embed(ids, mask, packed=True)
    enc_kv = []
    for layer in encoder.layers:
        # (2, 1, H, P, hd)
        enc_kv.append(torch.stack(layer.self_attn.project_kv(x[None])))
        x = layer(x, mask)
    cache = [dict() for _ in decoder.layers]
    # each layer's cache receives its self K/V ("k", "v") and cross K/V
    decoder(ids, x[None], mask, cache=cache)
    model.train(was_training)

    def stack(kvs):
        # (L, 2, 1, H, P, hd) -> (L, 2, H, P, hd)
        return torch.stack(kvs)[:, :, 0]

    return {
        "encoder": stack(enc_kv),
        "decoder": stack([torch.stack((c["k"], c["v"])) for c in cache]),
        "cross": stack([torch.stack((c["ck"], c["cv"])) for c in cache]),
    }


def prefix(model, prefix_len=PREFIX_LEN, sites=SITES, init_ids=None, mlp_hidden=0):
    """Registers a trainable Prefix as model.prefix. All three site kinds: 36 sites on
    bart-large, 14,745,600 parameters; the paper's 24, e.g. sites=("encoder", "decoder"):
    9,830,400. init_ids: the project's prefix_len most frequent token ids (most_frequent_ids):
    their K/V from the frozen model become the prefix (with the MLP, their embedding rows become
    its input table); None: random."""
    cfg = model.config
    sites = tuple(sites)
    if not sites or set(sites) - set(SITES):
        raise ValueError(f"prefix sites must be a non-empty subset of {SITES}, got {sites}")
    # the init runs the ids at positions 0..P-1
    if not 0 <= prefix_len <= cfg.max_position_embeddings:
        raise ValueError(
            f"prefix_len={prefix_len} is outside 0..{cfg.max_position_embeddings} "
            f"(max_position_embeddings); the paper uses {PREFIX_LEN}"
        )
    if init_ids is not None and tuple(init_ids.shape) != (prefix_len,):
        raise ValueError(
            f"init_ids must hold prefix_len={prefix_len} token ids (1-D), got shape "
            f"{tuple(init_ids.shape)}"
        )
    _begin(model, "prefix", prefix_len=prefix_len, sites=sites, mlp_hidden=mlp_hidden)
    w = model.model.shared.weight
    with torch.device(w.device):
        pre = Prefix(cfg, prefix_len, sites, mlp_hidden).to(w.dtype)
    with torch.no_grad():
        if init_ids is not None and prefix_len > 0 and mlp_hidden:
            pre.wte.copy_(w[init_ids.to(w.device)])
        elif init_ids is not None and prefix_len > 0:
            kv = kv_of_tokens(model, init_ids)
            for s in sites:
                pre.kv[s].copy_(kv[s])
    # a submodule now: its tensors are in parameters() and state_dict() as prefix.*
    model.prefix = pre
    if mlp_hidden:
        training = sum(p.numel() for p in pre.parameters())
        stored = sum(math.prod(s) for s in pre.shapes.values())
        print(
            f"prefix MLP: {training:,} parameters while training, "
            f"{stored:,} stored and served after merge()"
        )
    return _report(model)


def most_frequent_ids(sequences, n, exclude=()):
    """The n most frequent token ids in `sequences` (the project's training folds), ties broken
    by the smaller id, ids in `exclude` (special tokens: our choice, docs/checkpoints.md §7)
    skipped; fewer distinct ids than n: cycled to length n."""
    exclude = set(exclude)
    counts = Counter(t for seq in sequences for t in seq if t not in exclude)
    if not counts:
        raise ValueError("no tokens to take the most frequent ids from")
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[:n]
    cycled = ranked * math.ceil(n / len(ranked))
    return torch.tensor(cycled[:n], dtype=torch.long)


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(x)), the base frozen; A Kaiming-uniform, B zero (as PEFT):
    training starts exactly at the base model."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        self.scaling = alpha / r
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        # nn.Linear's own default init
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


def lora(model, r=LORA_RANK, alpha=LORA_ALPHA, targets=LORA_DEFAULT):
    """Wraps every nn.Linear named in `targets`: q_proj and v_proj of bart-large's 36 attentions
    (self and cross) at r = 8 are 1,179,648 parameters, PEFT's default for BART
    (docs/checkpoints.md §8)."""
    if r < 1 or not targets or set(targets) - set(LORA_TARGETS):
        raise ValueError(
            f"lora needs r >= 1 and targets among {LORA_TARGETS}, got r={r}, targets={targets}"
        )
    _begin(model, "lora", r=r, alpha=alpha, targets=tuple(targets))
    # listed first: the loop below changes the modules
    wrapped = [(m, n) for m in model.modules() for n, c in m.named_children() if n in targets]
    for mod, name in wrapped:
        setattr(mod, name, LoRALinear(getattr(mod, name), r, alpha))
    return _report(model)


@torch.no_grad()
def merge(model):
    """For inference: fold each LoRA into its base weight (W += alpha/r * B A) and a prefix MLP
    into its table."""
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight += child.scaling * child.lora_B @ child.lora_A
                setattr(mod, name, child.base)
    pre = model.prefix
    # keep the projected table, drop the MLP
    if isinstance(pre, Prefix) and hasattr(pre, "mlp"):
        pre.kv = nn.ParameterDict({s: nn.Parameter(t.clone()) for s, t in pre().items()})
        del pre.mlp
        del pre.wte
    return model


STRATEGIES = {"custom": custom, "leo": leo, "lldb": lldb, "prefix": prefix, "lora": lora}


def apply(model, name, **options):
    """strategies.apply(model, "prefix", prefix_len=200, init_ids=ids): the named strategy with
    its options."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid strategies: {', '.join(STRATEGIES)}")
    return STRATEGIES[name](model, **options)
