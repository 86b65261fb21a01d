"""``python -m captum_effattn.demo``: the README's main job.

Builds (or loads the cached) fine-tuned MiniLM sentiment classifier, then explains held-out Rotten
Tomatoes sentences and a long IMDB review with gradient-weighted efficient attention (the
faithfulness report's best mode), raw, effective, efficient and minimal attention, next to
IntegratedGradients and Saliency: a table in the terminal and an HTML page of token heatmaps.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    """The command line; the ``--views`` choices are the registered views."""
    from captum_effattn.attr import VIEWS

    parser = argparse.ArgumentParser(
        prog="python -m captum_effattn.demo", description=(__doc__ or "").split("\n\n")[1]
    )
    parser.add_argument(
        "--sentences", type=int, default=3, help="held-out Rotten Tomatoes sentences"
    )
    parser.add_argument(
        "--reviews", type=int, default=1, help="held-out IMDB reviews (256 word pieces)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("demo_output"), help="folder for the HTML page"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="classifier cache (default: $CAPTUM_EFFATTN_CACHE or ~/.cache/captum_effattn)",
    )
    parser.add_argument("--retrain", action="store_true", help="fine-tune again even if cached")
    parser.add_argument(
        "--views",
        nargs="+",
        choices=tuple(VIEWS),
        default=None,
        help="attention views to show (default: all)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    from captum_effattn.data import load_sentiment_classifier
    from captum_effattn.data.splits import imdb_heldout, rotten_tomatoes_splits
    from captum_effattn.demo.explain import Explainer
    from captum_effattn.demo.render import html_report, terminal_report

    classifier = load_sentiment_classifier(args.cache_dir, retrain=args.retrain)
    accuracy = classifier.metadata.get("accuracy", {}).get("after", {})
    shown = ", ".join(f"{split} {value:.1%}" for split, value in accuracy.items())
    print(
        f"classifier: MiniLM fine-tuned on Rotten Tomatoes sentences; held-out accuracy {shown}\n"
    )
    # imdb_heldout balances labels, so ask for an even number and keep the first ones.
    reviews = imdb_heldout(args.reviews + args.reviews % 2)[: args.reviews]
    texts = rotten_tomatoes_splits().test[: args.sentences] + reviews
    explainer = Explainer(classifier, views=args.views)
    explanations = [explainer.explain(review.text, review.label) for review in texts]
    print(terminal_report(explanations))
    args.out.mkdir(parents=True, exist_ok=True)
    page = args.out / "index.html"
    page.write_text(html_report(explanations), encoding="utf-8")
    print(f"\nHTML heatmaps: {page.resolve()}")


if __name__ == "__main__":
    main()
