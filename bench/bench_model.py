"""
Benchmark of model.py against HF transformers on the same weights (paper §2.1 model).
CPU, `tiny` preset (or --preset), fp32: training step time (forward + backward) and beam-5 generation tokens/s.
Goals: our step <= 0.8x HF's time; our generation >= 2x HF's throughput. Run: `make bench` or
`python bench/bench_model.py [--preset tiny] [--batch 8] [--src 256] [--tgt 128]`.
"""
import argparse
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, ".")
from model import BART, config_from_preset  # noqa: E402


def timeit(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--src", type=int, default=256)
    ap.add_argument("--tgt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    import transformers
    torch.manual_seed(0)
    cfg = config_from_preset(args.preset, dropout=0.0)
    ours = BART(cfg)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d + "/m")
        hf = transformers.BartForConditionalGeneration.from_pretrained(d + "/m")
    B, S, T, V = args.batch, args.src, args.tgt, cfg.vocab_size
    ids = torch.randint(3, V, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    for b in range(B):  # ragged right padding, lengths in [S/2, S]
        mask[b, S // 2 + (b * S // (2 * B)):] = 0
    ids[mask == 0] = 1
    dec = torch.randint(3, V, (B, T))
    dec[:, 0] = 2
    labels = torch.cat([dec[:, 1:], torch.full((B, 1), 2)], 1)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"preset {args.preset}: {ours.num_parameters():,} parameters; batch {B}, source {S} (ragged), target {T}")
    rows = []
    for impl in ("math", "sdpa"):
        ours.config.attn_impl = impl
        ours.train()

        def step_ours():
            logits = ours(ids, mask, dec)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
        rows.append((f"train step (ours, {impl})", timeit(step_ours, args.reps)))
    hf.train()
    hf.config.dropout = 0.0

    def step_hf():
        hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels).loss.backward()
    rows.append(("train step (HF)", timeit(step_hf, args.reps)))
    ours.eval(), hf.eval()
    gb = min(B, 4)
    kw = dict(num_beams=5, num_return_sequences=5, max_new_tokens=args.new_tokens)
    ours.config.attn_impl = "sdpa"
    # a length-bounded run: count generated tokens (beams x steps actually run) for throughput
    def gen_ours():
        return ours.generate(ids[:gb], mask[:gb], **kw)[0]
    def gen_hf():
        with torch.no_grad():
            return hf.generate(input_ids=ids[:gb], attention_mask=mask[:gb], do_sample=False, early_stopping=True,
                               no_repeat_ngram_size=0, forced_bos_token_id=None, forced_eos_token_id=None, **kw)
    so, sh = gen_ours(), gen_hf()
    same = torch.equal(so, sh)
    t_ours, t_hf = timeit(gen_ours, 2), timeit(gen_hf, 2)
    n_ours, n_hf = gb * 5 * (so.shape[1] - 1), gb * 5 * (sh.shape[1] - 1)
    print(f"\n| measure | ours | HF | ours / HF | goal |\n|---|---|---|---|---|")
    hf_step = rows[-1][1]
    for name, t in rows[:-1]:
        print(f"| {name}: ms | {t * 1e3:.1f} | {hf_step * 1e3:.1f} | {t / hf_step:.2f}x time | <= 0.8x |")
    print(f"| beam-5 generation: tokens/s | {n_ours / t_ours:.0f} | {n_hf / t_hf:.0f} | "
          f"{(n_ours / t_ours) / (n_hf / t_hf):.2f}x throughput | >= 2x |")
    print(f"\nsame beam-search output as HF: {same}")


if __name__ == "__main__":
    main()
