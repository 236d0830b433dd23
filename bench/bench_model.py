"""Benchmark of model.py and train.py's step against HF transformers on the same weights (paper §2.1
model).

make bench        # or: PYTHONPATH=. .venv/bin/python bench/bench_model.py [--preset tiny] [--batch
16]

CPU, `tiny` preset, fp32, both models in train mode (dropout 0.1) on the same weights and the same batch:
  1. one training step = forward + backward + AdamW step, batch 16, ragged sources of 64..256 tokens, targets of
     128 (and ragged 32..128), ours as train.py runs it (losses.loss_fn: the output layer on real target positions
     only; AdamW foreach) against HF (BartForConditionalGeneration(labels=...).loss, torch.optim.AdamW defaults);
     optionally (--compile) ours under torch.compile, its compile time beside;
  2. where our step's time goes (torch.profiler, grouped: GEMMs, attention, softmax + cross-entropy over the
     vocabulary, dropout, layer norm + GELU + adds, the optimizer, the rest);
  3. beam-5 generation with 5 returns against HF generate (same settings): tokens/s, and whether the sequences and
     the scores are the same; at two shapes: --gen-batch inputs x --new-tokens (4 x 64: a few requests, where fixed
     per-step costs weigh most) and evaluate.py's own (--eval-batch 16 inputs x 128 new tokens, what `make train`
     scores with).
Each ratio is against its reference measured in the same run, the two timed in alternation; medians of --reps
runs (the training step) or of 5 (each beam shape) after a warm-up.
"""

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import losses  # noqa: E402
from data.batch import collate  # noqa: E402
from model import BART, config_from_preset  # noqa: E402

GROUPS = {
    "GEMMs (linear, matmul)": ("addmm", "aten::mm", "bmm", "matmul", "linear"),
    "attention (sdpa)": ("scaled_dot_product",),
    "softmax + cross-entropy over V": ("log_softmax", "nll_loss"),
    "dropout (its random bits)": ("bernoulli", "dropout", "random_", "bitwise_and"),
    "layer norm, GELU, adds": ("layer_norm", "gelu", "aten::add", "aten::mul"),
    "optimizer (AdamW)": ("_foreach", "adamw", "addcdiv", "lerp", "sqrt"),
}


def timeit(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def time_pair(ours, ref, reps):
    """Medians of `ours` and `ref` timed in alternation (ours, ref, ours, ref, ...): a 2-core
    VM's speed drifts by 10-20% over a minute, and timing one after the other would put that
    drift into the ratio."""
    ours(), ref()  # warm-up
    ts = ([], [])
    for _ in range(reps):
        for fn, t in zip((ours, ref), ts):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return statistics.median(ts[0]), statistics.median(ts[1])


def batch(cfg, B, S, T, ragged_tgt, g):
    """Right-padded sources of S/4..S tokens and targets of T (or T/4..T) tokens, as
    data.batch.collate lays them out."""
    src = [
        [0] + torch.randint(4, cfg.vocab_size, (int(n) - 2,), generator=g).tolist() + [2]
        for n in torch.randint(S // 4, S + 1, (B,), generator=g)
    ]
    lens = torch.randint(T // 4, T + 1, (B,), generator=g) if ragged_tgt else torch.full((B,), T)
    # <s> t </s>
    tgt = [
        [0] + torch.randint(4, cfg.vocab_size, (int(n),), generator=g).tolist() + [2] for n in lens
    ]
    return collate(src, tgt, "cpu")


def profile(step):
    from torch.profiler import ProfilerActivity, profile as prof

    step()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3):
            step()
    ev = [
        e for e in p.key_averages() if e.key.startswith("aten::") or e.key.startswith("Optimizer")
    ]
    total = sum(e.self_cpu_time_total for e in ev)
    out = {g: 0.0 for g in GROUPS}
    out["the rest"] = 0.0
    for e in ev:
        g = next((g for g, keys in GROUPS.items() if any(k in e.key for k in keys)), "the rest")
        out[g] += e.self_cpu_time_total
    return {g: v / total for g, v in out.items()}


def beam(ours, hf, ids, mask, new_tokens):
    """Beam 5, 5 returned, on the same inputs: (ours tokens/s, HF tokens/s, same sequences, same
    scores)."""
    kw = dict(num_beams=5, num_return_sequences=5, max_new_tokens=new_tokens)

    def gen_ours():
        return ours.generate(ids, mask, **kw)

    # timed without output_scores (its fastest: the flag keeps every step's
    def gen_hf(output_scores=False):
        # scores, up to 2% of its time); the check needs it for sequences_scores
        with torch.no_grad():
            return hf.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                early_stopping=True,
                no_repeat_ngram_size=0,
                min_length=0,
                length_penalty=1.0,
                forced_bos_token_id=None,
                forced_eos_token_id=None,
                output_scores=output_scores,
                return_dict_in_generate=True,
                **kw,
            )

    (so, sc_o), h = gen_ours(), gen_hf(output_scores=True)
    same_seq = so.shape == h.sequences.shape and torch.equal(so, h.sequences)
    same_score = torch.allclose(sc_o, h.sequences_scores, atol=1e-5)
    t_ours, t_hf = time_pair(gen_ours, gen_hf, 5)
    n_ours, n_hf = (ids.shape[0] * 5 * (s.shape[1] - 1) for s in (so, h.sequences))
    return n_ours / t_ours, n_hf / t_hf, same_seq, same_score


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--src", type=int, default=256)
    ap.add_argument("--tgt", type=int, default=128)
    ap.add_argument("--gen-batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--eval-batch",
        type=int,
        default=16,
        help="the second beam row's inputs (0: no second row); "
        "it runs evaluate.py's max_new_tokens, 128",
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--compile", action="store_true", help="also time our step under torch.compile (inductor)"
    )
    args = ap.parse_args()
    if max(args.gen_batch, args.eval_batch) > args.batch:
        ap.error(
            f"--gen-batch and --eval-batch take their inputs from the --batch of {args.batch}: give at most that"
        )
    import transformers

    torch.manual_seed(0)
    cfg = config_from_preset(args.preset, attn_impl="sdpa")
    ours = BART(cfg)
    d = tempfile.mkdtemp()
    ours.save_pretrained(d + "/m")

    def load_hf():
        return transformers.BartForConditionalGeneration.from_pretrained(
            d + "/m", attn_implementation="sdpa"
        )

    hf, initial = load_hf(), {k: v.clone() for k, v in ours.state_dict().items()}
    print(
        f"machine: {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"preset {args.preset}: {ours.num_parameters():,} parameters, fp32, train mode (dropout {cfg.dropout})\n"
    )
    no_autocast = torch.autocast("cpu", enabled=False)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5, foreach=True)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    ours.train(), hf.train()
    rows, g = [], torch.Generator().manual_seed(1)
    for ragged in (False, True):
        ids, mask, dec, labels = b = batch(cfg, args.batch, args.src, args.tgt, ragged, g)
        pad = 1 - (mask.sum() + (labels != -100).sum()).item() / (mask.numel() + labels.numel())

        def step_ours(model=ours):
            losses.loss_fn(model, b, no_autocast).backward()
            opt_ours.step(), opt_ours.zero_grad(set_to_none=True)

        def step_hf():
            hf(
                input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels
            ).loss.backward()
            opt_hf.step(), opt_hf.zero_grad(set_to_none=True)

        t_ours, t_hf = time_pair(step_ours, step_hf, args.reps)
        what = f"train step, targets {'ragged ' + str(args.tgt // 4) + '..' if ragged else ''}{args.tgt} ({pad:.0%} pads)"
        rows.append((what, t_ours, t_hf))
        if args.compile and not ragged:
            compiled = torch.compile(ours, dynamic=False)
            t0 = time.perf_counter()
            step_ours(compiled)
            rows.append(
                (
                    f"  the same, ours under torch.compile (compile {time.perf_counter() - t0:.0f} s)",
                    timeit(lambda: step_ours(compiled), args.reps),
                    t_hf,
                )
            )
    shares = profile(step_ours)
    # the training steps moved both models apart: the same weights again
    ours.load_state_dict(initial), ours.eval()
    hf = load_hf().eval()
    shutil.rmtree(d)
    shapes = [(args.gen_batch, args.new_tokens)] + (
        [(args.eval_batch, 128)] if args.eval_batch else []
    )
    beam_rows = [beam(ours, hf, ids[:gb], mask[:gb], n) for gb, n in shapes]
    print("| measure | ours | HF | ours / HF | goal |\n|---|---|---|---|---|")
    for what, t, ref in rows:
        print(f"| {what}: ms | {t * 1e3:.0f} | {ref * 1e3:.0f} | {t / ref:.2f}x time | <= 0.8x |")
    for (gb, n), (ours_tps, hf_tps, _, _) in zip(shapes, beam_rows):
        print(
            f"| beam-5 generation, {gb} inputs, {n} new tokens: tokens/s | {ours_tps:.0f} | {hf_tps:.0f} | "
            f"{ours_tps / hf_tps:.2f}x throughput | >= 2x |"
        )
    print(
        "\n"
        + "; ".join(
            f"{gb} x {n}: same beam-search sequences as HF: {seq}, same scores (1e-5): {score}"
            for (gb, n), (_, _, seq, score) in zip(shapes, beam_rows)
        )
    )
    print(
        "\nwhere our training step's time goes (fixed targets; torch.profiler, self CPU time of aten ops):"
    )
    print(
        "| part | share |\n|---|---|\n" + "\n".join(f"| {k} | {v:.1%} |" for k, v in shares.items())
    )


if __name__ == "__main__":
    main()
