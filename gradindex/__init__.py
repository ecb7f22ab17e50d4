"""gradindex: which training sequences made a language model say this? EK-FAC influence, indexed."""

__version__ = "0.1.0"

from .data import Query, TokenizedSet, load_queries, load_texts, tokenize_queries, tokenize_texts  # noqa: E402
from .errors import GradIndexError  # noqa: E402
from .factors import Factors, FitConfig, fit_factors  # noqa: E402
from .layers import LayerSpec, select_layers  # noqa: E402
from .model import load_model  # noqa: E402
from .scores import ScoreResult, compute_scores, query_gradients  # noqa: E402

__all__ = [
    "Factors", "FitConfig", "GradIndexError", "LayerSpec", "Query", "ScoreResult", "TokenizedSet",
    "compute_scores", "fit_factors", "load_model", "load_queries", "load_texts", "query_gradients",
    "select_layers", "tokenize_queries", "tokenize_texts",
]
