"""diffusion-irl: sampler tuning by f-divergence inverse RL."""
