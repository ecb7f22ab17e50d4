"""gradindex: which training sequences made a language model say this? EK-FAC influence, indexed.

    import gradindex as gi
    gi.build("my-model", "train.jsonl", "indexes/mine")
    hits = gi.GradIndex.open("indexes/mine").query("The capital of Zorbania is", " Quellport.", k=10).hits
"""

__version__ = "0.1.0"

from .codeplan import CompressionConfig  # noqa: E402
from .data import Query  # noqa: E402
from .errors import GradIndexError  # noqa: E402
from .evaluation import EvalReport  # noqa: E402
from .factors import Factors  # noqa: E402
from .model import LanguageModel, load_model  # noqa: E402
from .options import BuildOptions, QueryOptions  # noqa: E402
from .pipeline import build, evaluate, fit, merge, score, validate  # noqa: E402
from .report import write_report  # noqa: E402
from .scores import ScoreResult  # noqa: E402
from .results import Hit, QueryResult  # noqa: E402
from .search import GradIndex  # noqa: E402
from .training import TrainRecipe  # noqa: E402
from .validation import ValidationConfig  # noqa: E402

__all__ = [
    "BuildOptions", "CompressionConfig", "EvalReport", "Factors", "GradIndex", "GradIndexError", "Hit", "LanguageModel", "Query",
    "QueryOptions", "QueryResult", "ScoreResult", "TrainRecipe", "ValidationConfig", "build", "evaluate", "fit", "load_model", "merge",
    "score", "validate", "write_report",
]
