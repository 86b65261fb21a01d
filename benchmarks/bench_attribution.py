"""Attribution benchmark: EfficientAttentionAttribution next to Saliency and IntegratedGradients.

On the fine-tuned MiniLM sentiment classifier and one real IMDB review truncated to n word pieces,
n in {64, 256, 512}, measured side by side in one run (best of ``--repeats``):

- one plain forward pass (the unit);
- ``EfficientAttentionAttribution.attribute`` for each view (all layers and heads, default query);
- Captum's Saliency and IntegratedGradients (``n_steps=50``) on the embeddings.

Run: ``PYTHONPATH=. python benchmarks/bench_attribution.py`` (builds or loads the classifier).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from captum.attr import IntegratedGradients, Saliency

from captum_effattn import EfficientAttentionAttribution

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from captum_effattn.data import load_sentiment_classifier
    from captum_effattn.data.splits import imdb_heldout

    classifier = load_sentiment_classifier()
    model, tokenizer = classifier.model.eval(), classifier.tokenizer
    text = next(
        r.text for r in imdb_heldout(50) if len(tokenizer(r.text)["input_ids"]) >= max(args.sizes)
    )

    def forward(embeddings, mask):
        return model(inputs_embeds=embeddings, attention_mask=mask).logits

    attention = EfficientAttentionAttribution(forward, model=model)
    ig, saliency = IntegratedGradients(forward), Saliency(forward)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times in seconds\n")
    print(
        "| n | forward | efficient | efficient / forward | effective / forward | raw / forward "
        "| Saliency / forward | IG (50 steps) / forward | IG / efficient |"
    )
    print("|" + " --- |" * 9)
    for n in args.sizes:
        enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=n)
        timings = measure(model, enc, attention, ig, saliency, args.repeats)
        unit = timings["forward"]
        print(
            f"| {n} | {unit:.3f} | {timings['efficient']:.3f} | {timings['efficient'] / unit:.1f}x "
            f"| {timings['effective'] / unit:.1f}x | {timings['raw'] / unit:.1f}x "
            f"| {timings['saliency'] / unit:.1f}x | {timings['ig'] / unit:.1f}x "
            f"| {timings['ig'] / timings['efficient']:.0f}x |",
            flush=True,
        )


def measure(model, enc, attention, ig, saliency, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds of a forward pass and of each method on one encoded text."""
    mask = enc["attention_mask"]
    embeddings = model.get_input_embeddings()(enc["input_ids"]).detach()
    with torch.no_grad():
        target = int(model(inputs_embeds=embeddings, attention_mask=mask).logits.argmax())
    kwargs = {"target": target, "additional_forward_args": (mask,)}

    def plain():
        with torch.no_grad():
            model(inputs_embeds=embeddings, attention_mask=mask)

    timings = {"forward": best_of(plain, repeats)}
    for view in ("efficient", "effective", "raw"):
        timings[view] = best_of(
            lambda view=view: attention.attribute(embeddings, view=view, **kwargs), repeats
        )
    timings["saliency"] = best_of(lambda: saliency.attribute(embeddings, **kwargs), repeats)
    baseline = torch.zeros_like(embeddings)
    timings["ig"] = best_of(
        lambda: ig.attribute(
            embeddings, baselines=baseline, n_steps=50, internal_batch_size=10, **kwargs
        ),
        max(1, repeats // 2),
    )
    return timings


if __name__ == "__main__":
    main()
