"""EditReward runtime: score (instruction, source image, edited image) triples on ONNX Runtime,
TensorRT or PyTorch. Imports with numpy, pillow and tokenizers alone; backends load lazily."""

__version__ = "0.1.0"

from .batching import BatchingScorer  # noqa: E402
from .errors import EditRewardError  # noqa: E402
from .scorer import HeadScore, Score, Scorer, preference  # noqa: E402

__all__ = ["BatchingScorer", "EditRewardError", "HeadScore", "Score", "Scorer", "preference", "__version__"]
