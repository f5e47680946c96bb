"""Task metrics, latency, parameter and FLOP accounting."""

from cahp.evaluation.metrics import classification_metrics, evaluate_split, predict_logits

__all__ = ["classification_metrics", "evaluate_split", "predict_logits"]
