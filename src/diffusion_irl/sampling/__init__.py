"""Samplers over a denoiser D(x, sigma): schedules, pure solver functions, and config-facing sampler objects."""
