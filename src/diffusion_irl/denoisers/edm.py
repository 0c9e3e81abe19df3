"""NVlabs/edm network pickles (``edm-cifar10-32x32-uncond-vp.pkl``, ``edm-imagenet-64x64-cond-adm.pkl``, ...) as a
denoiser ``D(x, sigma)``.

Format: ``pickle.load(f)`` gives a dict whose ``ema`` entry is EDM's preconditioned network
``net(x, sigma, class_labels=None, force_fp32=False)`` (already a denoiser in EDM's sigma-space, the space of every
sampler here), with attributes ``img_resolution``, ``img_channels``, ``label_dim``, ``use_fp16``, ``sigma_min`` and
``sigma_max``. The pickles reference EDM's own modules (``torch_utils.persistence`` keeps each network's source
inside the pickle, and that source imports ``torch_utils`` and ``dnnlib``), so a checkout of the EDM repository
(``denoiser.repo``) is put on ``sys.path`` before unpickling; it stays there, because copying or re-pickling the
network imports those modules again. Unpickling runs code from the file: load only pickles you trust.

Labels follow the project's contract (``denoisers/networks.py``): ``class_labels`` is a long [B] tensor with values
in ``0..num_classes``, where ``num_classes`` (= the network's ``label_dim``) is the null class. They become EDM's
one-hot ``class_labels`` [B, label_dim], and the null class becomes the all-zero row, which is what EDM's network
uses itself when it gets no labels. Without labels, ``labels`` decides: ``null`` (all rows null, EDM's behaviour) or
``cycle`` (row i of a call gets class ``i mod label_dim``: balanced classes for an evaluator that passes no labels).
An unconditional network (``label_dim = 0``) ignores labels, as EDM's does.
"""
from __future__ import annotations

import os
import pickle
import sys

import torch
from torch import Tensor, nn

from diffusion_irl.config import ConfigError
from diffusion_irl.tensors import batch_sigma

REQUIRED_ATTRIBUTES = ("img_resolution", "img_channels", "label_dim", "use_fp16")
LABEL_MODES = (None, "cycle")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class EDMNetworkDenoiser(nn.Module):
    """An EDM preconditioned network (the ``ema`` entry of an EDM pickle) behind the project's ``D(x, sigma, y)``.

    Args:
        net: EDM's ``EDMPrecond`` / ``VPPrecond`` / ``VEPrecond`` (or anything with their call and attributes).
        labels: what a call without ``class_labels`` gives a conditional network: ``None`` (EDM's all-zero label)
            or ``"cycle"`` (class ``i mod label_dim`` for row i; keep the sampling batch a multiple of
            ``label_dim`` so that every sample index gets the same class whatever the chunking).

    ``D(x, sigma, class_labels)`` hands the network float32 ``x`` and a float32 [B] sigma; the network computes in
    float16 where its ``use_fp16`` says so (EDM: on CUDA only) and returns float32, which is cast to x's dtype.
    """

    def __init__(self, net: nn.Module, labels: str | None = None):
        super().__init__()
        if labels not in LABEL_MODES:
            raise ConfigError(f"denoiser.labels: must be null or cycle, got {labels!r}")
        self.net = net
        self.labels = labels
        self.resolution = int(net.img_resolution)
        self.shape = (int(net.img_channels), self.resolution, self.resolution)
        self.num_classes = int(net.label_dim or 0)
        self.sigma_min = float(getattr(net, "sigma_min", 0.0))
        self.sigma_max = float(getattr(net, "sigma_max", float("inf")))
        self.sigma_data = float(getattr(net, "sigma_data", 0.5))

    @property
    def use_fp16(self) -> bool:
        return bool(self.net.use_fp16)

    def one_hot(self, class_labels: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        """EDM's ``class_labels`` [B, label_dim] (float32) for our integer labels; ``None`` for an unconditional net."""
        n = self.num_classes
        if n == 0:
            return None
        if class_labels is None:
            if self.labels == "cycle":
                class_labels = torch.arange(batch, device=device) % n
            else:
                return torch.zeros(batch, n, dtype=torch.float32, device=device)
        labels = torch.as_tensor(class_labels, device=device).reshape(-1).long()
        if labels.shape != (batch,):
            raise ValueError(f"class_labels must have shape [{batch}], got {tuple(labels.shape)}")
        if ((labels < 0) | (labels > n)).any():
            raise ValueError(f"class_labels must lie in 0..{n} ({n} = null class), got {labels.min()}..{labels.max()}")
        return nn.functional.one_hot(labels, n + 1)[:, :n].to(torch.float32)

    def forward(self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"the EDM network expects x of shape [B, {', '.join(map(str, self.shape))}], got "
                             f"{tuple(x.shape)}")
        s = batch_sigma(sigma, x).to(torch.float32).contiguous()
        labels = self.one_hot(class_labels, x.shape[0], x.device)
        out = self.net(x.to(torch.float32), s, class_labels=labels)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, num_classes={self.num_classes}, use_fp16={self.use_fp16}, "
                f"labels={self.labels}")


def _check_repo(repo: str | os.PathLike | None) -> str:
    if repo is None or not str(repo):
        raise ConfigError("denoiser.repo: not set; point it at a checkout of NVlabs/edm (its torch_utils/ and "
                          "dnnlib/ are imported by the network pickles), e.g. denoiser.repo=/path/to/edm")
    repo = os.path.abspath(os.path.expanduser(os.fspath(repo)))
    if not os.path.isdir(repo):
        raise ConfigError(f"denoiser.repo: no such directory: {repo} (a checkout of NVlabs/edm)")
    missing = [m for m in ("torch_utils", "dnnlib") if not os.path.isfile(os.path.join(repo, m, "__init__.py"))]
    if missing:
        raise ConfigError(f"denoiser.repo: {repo} has no {' or '.join(m + '/' for m in missing)} package: not a "
                          "checkout of NVlabs/edm")
    return repo


def read_edm_pickle(path: str | os.PathLike, repo: str | os.PathLike | None) -> nn.Module:
    """The ``ema`` network of an EDM pickle, with ``repo`` on ``sys.path``; one :class:`ConfigError` otherwise."""
    if path is None or not str(path):
        raise ConfigError("denoiser.path: not set (an EDM network pickle, e.g. edm-cifar10-32x32-uncond-vp.pkl)")
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise ConfigError(f"denoiser.path: no such file: {path} (an EDM network pickle, e.g. "
                          "edm-cifar10-32x32-uncond-vp.pkl)")
    if os.path.getsize(path) == 0:
        raise ConfigError(f"denoiser.path: {path} is empty, not an EDM network pickle")
    repo = _check_repo(repo)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"denoiser.repo: unpickling {path} needs the module {exc.name!r}, which {repo} does not "
                          "provide: is denoiser.repo a checkout of NVlabs/edm?") from None
    except Exception as exc:  # noqa: BLE001 - random bytes raise anything from UnpicklingError to MemoryError
        raise ConfigError(f"denoiser.path: {path} is not an EDM network pickle ({_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"denoiser.path: {path} holds a {type(data).__name__}, not an EDM network pickle (a dict "
                          "with an `ema` network)")
    if "ema" not in data:
        raise ConfigError(f"denoiser.path: {path} has no `ema` entry (keys: {', '.join(map(str, data)) or 'none'}): "
                          "not an EDM network pickle")
    net = data["ema"]
    missing = [a for a in REQUIRED_ATTRIBUTES if not hasattr(net, a)]
    if not isinstance(net, nn.Module) or missing:
        what = f"lacks {', '.join(missing)}" if missing else f"is a {type(net).__name__}, not a torch module"
        raise ConfigError(f"denoiser.path: the `ema` entry of {path} {what}: not an EDM preconditioned network")
    return net


def load_edm_denoiser(path: str | os.PathLike, repo: str | os.PathLike | None = None, use_fp16: bool | None = None,
                      labels: str | None = None, device: str | torch.device = "cpu") -> EDMNetworkDenoiser:
    """Load an EDM network pickle as ``D(x, sigma)`` (eval mode, no grad) on ``device``.

    Args:
        path: the pickle, e.g. ``edm-cifar10-32x32-uncond-vp.pkl``.
        repo: a checkout of NVlabs/edm (put on ``sys.path`` before unpickling).
        use_fp16: ``None`` keeps the network's own setting; ``True`` / ``False`` sets its ``use_fp16`` (EDM runs
            float16 only on CUDA).
        labels: ``None`` or ``"cycle"``, see :class:`EDMNetworkDenoiser`.
    """
    if use_fp16 is not None and not isinstance(use_fp16, bool):
        raise ConfigError(f"denoiser.use_fp16: must be true, false or null, got {use_fp16!r}")
    if labels not in LABEL_MODES:
        raise ConfigError(f"denoiser.labels: must be null or cycle, got {labels!r}")
    net = read_edm_pickle(path, repo)
    if use_fp16 is not None:
        net.use_fp16 = use_fp16
    denoiser = EDMNetworkDenoiser(net, labels=labels)
    return denoiser.to(device).requires_grad_(False).eval()
