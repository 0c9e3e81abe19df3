"""Shared by the benchmark scripts: device synchronisation and the printed tables (one row = one dict)."""
from __future__ import annotations

import torch


def sync(device: str) -> None:
    """Wait for queued CUDA work before reading a clock (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def format_row(row: dict) -> str:
    return "  ".join(f"{k}={fmt(v)}" for k, v in row.items())


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
