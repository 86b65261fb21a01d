"""Show explanations: a table in the terminal and an HTML page of token heatmaps."""

from __future__ import annotations

import html
from collections.abc import Sequence

import torch

from captum_effattn.attr import VIEWS
from captum_effattn.demo.explain import LEAD_METHOD, Explanation

SHORT_TEXT_TOKENS = 24
TOP_TOKENS = 8


def special_mask(explanation: Explanation) -> torch.Tensor:
    """``(S,)`` True at the tokenizer's special tokens ([CLS], [SEP]); from the token strings
    when the explanation does not say."""
    if explanation.special:
        return torch.tensor(explanation.special, dtype=torch.bool)
    return torch.tensor([t.startswith("[") and t.endswith("]") for t in explanation.tokens])


def _normalized(scores: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """Scores divided by their largest magnitude over the text's own word pieces.

    Attention piles onto [CLS] and [SEP]; scaling by them would flatten every real word, so they
    are left out of the scale (and drawn uncoloured).
    """
    own = ~special
    peak = scores[own].abs().max() if own.any() else scores.abs().max()
    return scores / peak if peak > 0 else scores


SUM_TOLERANCE = 1e-6
"""How far from 1 a row's sum may be and still count as summing to 1 (both print as 1.00)."""


def effective_rows_are_distributions(explanation: Explanation) -> bool:
    """Whether every effective [CLS] row is non-negative and sums to 1 (within tolerance)."""
    low, high = explanation.effective_sums
    return (
        explanation.effective_min >= 0
        and abs(low - 1) <= SUM_TOLERANCE
        and abs(high - 1) <= SUM_TOLERANCE
    )


def _header(explanation: Explanation, number: int) -> list[str]:
    text = explanation.text if len(explanation.text) < 160 else explanation.text[:157] + "..."
    low, high = explanation.effective_sums
    if explanation.identifiable:
        views = (
            "    short input (n <= d + 1): every explained row is identifiable, so the "
            "attention views coincide"
        )
    else:
        views = f"    effective [CLS] rows sum to {low:.2f}..{high:.2f}"
        if explanation.effective_min < 0:
            views += f" with entries down to {explanation.effective_min:.2g}"
        if effective_rows_are_distributions(explanation):
            views += ": distributions on this input; efficient rows are the minimum-norm ones"
        else:
            views += (
                ": not distributions; efficient rows are distributions with the same head outputs"
            )
    return [
        f"[{number}] {text}",
        f"    true: {explanation.label}; predicted: {explanation.prediction} "
        f"(p = {explanation.probability:.3f}); {len(explanation.tokens)} word pieces",
        f"    efficient attention substituted in all heads: logits move by "
        f"{explanation.logit_change:.1e} (relative); head outputs reproduced to "
        f"{explanation.head_output_error:.1e}",
        views,
    ]


def _token_table(explanation: Explanation) -> list[str]:
    """The text's own word pieces (special tokens left out) and every method's scaled score."""
    methods = tuple(explanation.scores)
    columns = ["token", *methods]
    special = special_mask(explanation)
    scaled = {m: _normalized(explanation.scores[m], special) for m in methods}
    rows = [
        [token, *(f"{float(scaled[m][i]):+.2f}" for m in methods)]
        for i, token in enumerate(explanation.tokens)
        if not special[i]
    ]
    return _format(columns, rows)


def top_tokens(explanation: Explanation, method: str, count: int = TOP_TOKENS) -> list[str]:
    """``method``'s ``count`` highest-|score| word pieces of the text itself (special tokens
    never compete: attention parks mass on them whatever the input says)."""
    scores = explanation.scores[method].abs().masked_fill(special_mask(explanation), -1.0)
    order = torch.argsort(scores, descending=True, stable=True)
    own = [i for i in order.tolist() if scores[i] >= 0][:count]
    return [explanation.tokens[i] for i in own]


def _top_table(explanation: Explanation) -> list[str]:
    methods = tuple(explanation.scores)
    columns = ["rank", *methods]
    tops = {m: top_tokens(explanation, m) for m in methods}
    rows = [
        [str(rank + 1), *(tops[m][rank] if rank < len(tops[m]) else "" for m in methods)]
        for rank in range(TOP_TOKENS)
    ]
    return _format(columns, rows)


def _format(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    line = "    " + "  ".join(str(c).ljust(w) for c, w in zip(columns, widths, strict=True))
    rule = "    " + "  ".join("-" * w for w in widths)
    body = [
        "    " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows
    ]
    return [line, rule, *body]


def terminal_report(explanations: Sequence[Explanation]) -> str:
    """Per example: the checks, then token scores (short texts) or each method's top tokens."""
    lines: list[str] = []
    for number, explanation in enumerate(explanations, 1):
        lines += _header(explanation, number)
        if len(explanation.tokens) <= SHORT_TEXT_TOKENS:
            lines += [
                "    token scores, each method scaled to its largest word-piece magnitude "
                "([CLS]/[SEP] not shown):"
            ]
            lines += _token_table(explanation)
        else:
            lines += [f"    top {TOP_TOKENS} word pieces by |score| ([CLS]/[SEP] not ranked):"]
            lines += _top_table(explanation)
        lines.append("")
    methods = explanations[0].scores if explanations else {}
    seconds = {m: sum(e.seconds[m] for e in explanations) / len(explanations) for m in methods}
    lines.append(
        "mean seconds per example: " + ", ".join(f"{m} {s:.2f}" for m, s in seconds.items())
    )
    return "\n".join(lines)


def _cell(token: str, value: float, special: bool = False) -> str:
    if special:  # outside the colour scale: grey, its value in the tooltip
        return (
            f'<span style="background:#e0e0e0;color:#666" title="{value:+.3f} (special token, '
            f'not on the colour scale)">{html.escape(token)}</span>'
        )
    value = max(-1.0, min(1.0, value))
    colour = f"rgba(0, 128, 0, {value:.3f})" if value >= 0 else f"rgba(200, 0, 0, {-value:.3f})"
    return f'<span style="background:{colour}" title="{value:+.3f}">{html.escape(token)}</span>'


SIGNED_METHODS = {
    "IntegratedGradients": "signed: green for the predicted class, red against it",
    "Saliency": "absolute gradients: never negative",
}
"""What the sign of each gradient method's scores means (the demo runs Saliency with abs=True)."""


def _sign_meaning(method: str) -> str:
    """What green and red mean for ``method``: from the view registry for attention views."""
    if method == LEAD_METHOD:
        return (
            "class-specific: each token's efficient attention times the positive part of the "
            "predicted class's gradient with respect to it, averaged over heads and layers; "
            "never negative"
        )
    views = {view.method_name: view for view in VIEWS.values()}
    if method in views:
        if views[method].distribution:
            return "a distribution over the tokens: never negative"
        return (
            "not a distribution: weights can be negative (red) and need not sum to 1; a "
            "negative weight is part of how the head output is built, not evidence against the "
            "class"
        )
    return SIGNED_METHODS.get(method, "signed: green positive, red negative")


def legend(explanations: Sequence[Explanation]) -> str:
    """The HTML legend: the colour scale, and per method what its sign means and whether this
    page holds negative scores for it."""
    methods = list(explanations[0].scores) if explanations else []
    items = []
    for method in methods:
        negative = any(bool((e.scores[method] < 0).any()) for e in explanations)
        seen = "negative scores on this page (red)" if negative else "no negative score here"
        items.append(
            f"<li><b>{html.escape(method)}</b>: {html.escape(_sign_meaning(method))}; {seen}.</li>"
        )
    return (
        "<p>Green: a positive score, red: a negative one, each method scaled to its largest "
        "magnitude over the text's own word pieces; [CLS] and [SEP] are grey, off the scale "
        "(attention parks mass there); hover a token for its value.</p><ul>"
        + "".join(items)
        + "</ul>"
    )


def html_report(explanations: Sequence[Explanation]) -> str:
    """A standalone HTML page: one heatmap row of tokens per method and example."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>captum_effattn demo</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}"
        "span{padding:1px 2px;margin:1px;border-radius:3px;display:inline-block}"
        "td{vertical-align:top;padding:4px}th{text-align:left}</style>",
        "<h1>Efficient attention next to IntegratedGradients and Saliency</h1>",
        f"<p>First row: <b>{html.escape(LEAD_METHOD)}</b>, the best efficient-based mode of the "
        "faithfulness report (docs/faithfulness.md).</p>",
        legend(explanations),
    ]
    for number, explanation in enumerate(explanations, 1):
        parts.append(
            f"<h2>[{number}] true: {explanation.label}, predicted: "
            f"{explanation.prediction} (p = {explanation.probability:.3f})</h2>"
        )
        parts.append(
            "<p>"
            + "<br>".join(html.escape(x) for x in _header(explanation, number)[2:])
            + "</p><table>"
        )
        special = special_mask(explanation)
        for method in explanation.scores:
            scores = _normalized(explanation.scores[method], special)
            cells = "".join(
                _cell(t, float(v), bool(s))
                for t, v, s in zip(explanation.tokens, scores, special, strict=True)
            )
            parts.append(f"<tr><th>{method}</th><td>{cells}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts)
