"""LoRA adapters (Hu et al. 2021) for the SAM mask decoder, in plain PyTorch.

``LoRALinear`` wraps a frozen ``nn.Linear``: ``y = W x + b + (alpha / r) * B(A(x))`` with A (r, in)
Kaiming-initialised and B (out, r) zero-initialised, so an adapted model starts *identical* to the
frozen one. Only A and B train. Adapters are saved as ``lora_decoder.safetensors`` (keys
``<linear path>.lora_a`` / ``.lora_b``; metadata ``rank``, ``alpha``, ``targets``) next to the VRP
encoder, and :func:`vrpsam_med.models.vrp.load_vrp` applies them when present.

The image encoder is not adapted (see docs/finetune.md): its embeddings are cached on disk, and an
adapted encoder would have to re-encode every training slice at every step.
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LORA_FILE = "lora_decoder.safetensors"
#: the two-way transformer's attention projections and MLP linears
DEFAULT_TARGETS = r"^transformer\..*(q_proj|k_proj|v_proj|out_proj|lin1|lin2)$"


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update (B initialised to zero)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:  # modules that read ``.weight`` (dtype/device checks) still work
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        return self.base(x) + self._update(x)

    def without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The linear part, ``forward(x) - bias`` (the decoder adds positional terms after projecting)."""
        return F.linear(x, self.base.weight) + self._update(x)

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_a.to(x.dtype).t() @ self.lora_b.to(x.dtype).t()) * self.scale


def apply_lora(module: nn.Module, rank: int, alpha: float, targets: str = DEFAULT_TARGETS) -> list[str]:
    """Replace (in place) every ``nn.Linear`` whose dotted path matches ``targets``; returns the paths."""
    pattern = re.compile(targets)
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and pattern.search(n)]
    if not names:
        raise ValueError(f"no nn.Linear matches the LoRA target pattern {targets!r}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return names


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: ``{'<path>.lora_a': (r, in), '<path>.lora_b': (out, r)}``."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, LoRALinear):
            out[f"{name}.lora_a"] = m.lora_a.detach().cpu().contiguous()
            out[f"{name}.lora_b"] = m.lora_b.detach().cpu().contiguous()
    return out


def save_lora(module: nn.Module, path: Path, rank: int, alpha: float, targets: str = DEFAULT_TARGETS) -> None:
    """Adapters of ``module`` -> ``path`` (safetensors, atomic)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(lora_state_dict(module), str(tmp), metadata={"rank": str(rank), "alpha": str(alpha), "targets": targets})
    tmp.replace(path)


def load_lora(module: nn.Module, path: Path) -> None:
    """Apply the adapters saved in ``path`` to ``module`` (in place; wraps the target linears first)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    rank, alpha = int(meta["rank"]), float(meta["alpha"])
    if not any(isinstance(m, LoRALinear) for m in module.modules()):
        apply_lora(module, rank, alpha, meta.get("targets", DEFAULT_TARGETS))
    state = load_file(str(path))
    have = {f"{n}.{p}": m for n, m in module.named_modules() if isinstance(m, LoRALinear) for p in ("lora_a", "lora_b")}
    if set(state) != set(have):
        raise ValueError(f"{path}: adapters do not fit this mask decoder "
                         f"({len(set(have) - set(state))} missing, {len(set(state) - set(have))} unexpected)")
    with torch.no_grad():
        for key, tensor in state.items():
            getattr(have[key], key.rsplit(".", 1)[1]).copy_(tensor)


def with_adapted_decoder(backbone: nn.Module, rank: int, alpha: float, targets: str = DEFAULT_TARGETS) -> nn.Module:
    """A shallow copy of ``backbone`` whose mask decoder is a LoRA-wrapped *copy*.

    The image and prompt encoders stay shared (no extra memory); the caller's backbone (used for
    plain box prompting and by other models) is left untouched.
    """
    adapted = copy.copy(backbone)
    adapted._modules = dict(backbone._modules)  # own module table: replacing the decoder must not leak
    decoder = copy.deepcopy(backbone.mask_decoder)
    apply_lora(decoder, rank, alpha, targets)
    adapted.mask_decoder = decoder
    return adapted


def load_lora_backbone(backbone: nn.Module, path: Path) -> nn.Module:
    """``backbone`` with the decoder adapters saved in ``path`` (a copy; see :func:`with_adapted_decoder`)."""
    from safetensors import safe_open

    from vrpsam_med.models.backbones import CheckpointError

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        adapted = with_adapted_decoder(backbone, int(meta["rank"]), float(meta["alpha"]),
                                       meta.get("targets", DEFAULT_TARGETS))
        load_lora(adapted.mask_decoder, path)
    except Exception as exc:  # noqa: BLE001 - missing metadata, unreadable file, shapes that do not fit
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise CheckpointError(f"{path}: not usable LoRA adapters ({reason})") from exc
    return adapted.requires_grad_(False)
