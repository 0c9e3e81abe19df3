"""Inverse-RL pieces that are pure functions of tensors: f-divergence rewards and the PPO loss."""
