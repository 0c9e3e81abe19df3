"""The baselines a tuned sampler must beat, and the training run's comparison table (docs/method.md sections 7, 9)."""
