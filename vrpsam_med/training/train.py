"""Episodic meta-training of the VRP encoder on cached embeddings (SAM frozen).

Resumable: ``RUN_DIR/last/`` holds the encoder (safetensors), optimizer and sampler state; a run
stops at ``max_steps`` or after ``time_budget_s`` and a later run with the same ``RUN_DIR``
continues exactly where it stopped (same seed -> same result). DDP via ``torchrun`` (gloo on CPU,
nccl on GPU): each rank samples its own episodes, gradients are averaged.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vrpsam_med.models.backbones import bf16_is_fast
from vrpsam_med.models.vrp import VRPSAM, VRPEncoder, mask_to_embedding_grid
from vrpsam_med.training.episodes import Batch, EpisodeConfig, EpisodeSampler

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    datasets: list[str] = field(default_factory=list)
    split: str = "train"
    exclude_labels: list[str] = field(default_factory=list)
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    max_steps: int = 5000
    time_budget_s: float = 0.0  # 0 = no limit
    checkpoint_every: int = 100
    seed: int = 0
    num_queries: int = 50
    presence_weight: float = 0.5
    bf16: bool | str = "auto"  # bf16 autocast: "auto" (where it is faster), true, false
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)


def mask_loss(logits: torch.Tensor, gt: torch.Tensor, present: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """BCE + soft Dice (Dice only where ``present``): logits, gt (B, 1, H, W); -> (bce, dice loss, hard Dice)."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, gt)
    prob = torch.sigmoid(logits)
    inter = (prob * gt).sum(dim=(1, 2, 3))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + gt.sum(dim=(1, 2, 3)) + 1)
    pos = present > 0
    dice_loss = dice[pos].mean() if pos.any() else logits.sum() * 0
    with torch.no_grad():
        hard = (logits > 0).float()
        d = (2 * (hard * gt).sum(dim=(1, 2, 3)) / (hard.sum(dim=(1, 2, 3)) + gt.sum(dim=(1, 2, 3))).clamp_min(1))
        hard_dice = float(d[pos].mean()) if pos.any() else float("nan")
    return bce, dice_loss, hard_dice


def losses(logits: torch.Tensor, presence: torch.Tensor, batch: Batch, presence_weight: float
           ) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE + Dice on the mask (Dice only where the target is present) + BCE on presence."""
    bce, dice_loss, hard_dice = mask_loss(logits, batch.tgt_mask, batch.present)
    pres = F.binary_cross_entropy_with_logits(presence.float(), batch.present)
    total = bce + dice_loss + presence_weight * pres
    metrics = {"loss": float(total.detach()), "bce": float(bce.detach()), "dice_loss": float(dice_loss.detach()),
               "presence": float(pres.detach()),
               "dice": hard_dice}
    return total, metrics


def init_distributed() -> tuple[int, int, bool]:
    """(rank, world size, distributed?) from torchrun's environment; joins the process group once."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed:
        return 0, 1, False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


@contextmanager
def distributed_session() -> Iterator[tuple[int, int, bool]]:
    """Join torchrun's process group (if any) for the block and leave it afterwards.

    A process that exits with a live gloo group can abort (SIGABRT) while its threads are torn down.
    """
    try:
        yield init_distributed()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def batch_to(batch: Batch, device: torch.device) -> Batch:
    return Batch(*(x.to(device) if torch.is_tensor(x) else x for x in (
        batch.ref_emb, batch.ref_mask, batch.tgt_emb, batch.tgt_mask, batch.present, batch.kinds)))


def training_uses_bf16(setting: bool | str, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast on ``device``.

    ``"auto"``: the encoder's rule, :func:`bf16_is_fast` (a training step took 2.1 s in bf16 and 1.3 s
    in fp32 on an AVX-512 BF16 CPU without AMX, docs/benchmarks.md). ``True`` forces it wherever bf16
    exists; ``False`` is fp32.
    """
    if setting == "auto":
        return bf16_is_fast(device)
    return bool(setting) and (device.type == "cpu" or torch.cuda.is_bf16_supported())


def forward_episodes(encoder: torch.nn.Module, backbone: torch.nn.Module, b: Batch, use_bf16: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One reference per episode -> mask logits (B, 1, 256, 256) and presence logits (B,)."""
    with torch.autocast(b.tgt_emb.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        pos = backbone.prompt_encoder.get_dense_pe()
        tokens, presence = encoder(b.ref_emb[:, 0], mask_to_embedding_grid(b.ref_mask[:, 0]), b.tgt_emb, pos)
        logits, _ = backbone.decode(b.tgt_emb, tokens)
    return logits, presence


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_encoder(encoder: VRPEncoder, folder: Path, card: dict) -> None:
    """``folder/vrp_encoder.safetensors`` + ``folder/model_card.json``, atomically."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "vrp_encoder.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}, str(tmp),
              metadata={"num_queries": str(encoder.num_queries)})
    tmp.replace(folder / "vrp_encoder.safetensors")
    tmpc = folder / "model_card.json.tmp"
    tmpc.write_text(json.dumps(card, indent=2))
    tmpc.replace(folder / "model_card.json")


def train(cfg: TrainConfig, records, backbone, run_dir: Path, command: str = "") -> dict:
    """Train (or resume) in ``run_dir``. Returns the final log row."""
    rank, _, distributed = init_distributed()
    device = backbone.device
    torch.manual_seed(cfg.seed)
    model = VRPSAM(backbone, VRPEncoder(num_queries=cfg.num_queries)).to(device)
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = EpisodeSampler(records, cfg.episodes, seed=cfg.seed * 1000 + rank)
    step = 0
    last = run_dir / "last"
    if (last / "state.pt").exists():
        from safetensors.torch import load_file

        model.encoder.load_state_dict(load_file(str(last / "vrp_encoder.safetensors")))
        state = torch.load(last / "state.pt", map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        sampler.set_state(json.loads(state["sampler"][rank]))
        torch.set_rng_state(state["torch_rng"])
        if rank == 0:
            log.warning("resumed %s at step %d", run_dir, step)
    encoder = model.encoder
    if distributed:
        encoder = torch.nn.parallel.DistributedDataParallel(model.encoder)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "log.csv"
    t0 = time.perf_counter()
    row: dict = {}
    use_bf16 = training_uses_bf16(cfg.bf16, device)
    if rank == 0:
        log.warning("training precision: %s", "bf16 autocast" if use_bf16 else "fp32")
    while step < cfg.max_steps:
        b = batch_to(sampler.batch(cfg.batch_size), device)
        logits, presence = forward_episodes(encoder, backbone, b, use_bf16)
        loss, metrics = losses(logits, presence, b, cfg.presence_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        elapsed = time.perf_counter() - t0
        row = {"step": step, "seconds": round(elapsed, 1), **{k: round(v, 5) for k, v in metrics.items()}}
        if rank == 0 and (step % 10 == 0 or step == 1):
            new = not log_path.exists()
            with log_path.open("a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)
        out_of_time = cfg.time_budget_s > 0 and elapsed >= cfg.time_budget_s
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or out_of_time:
            _checkpoint(cfg, model, opt, sampler, step, run_dir, rank, distributed, command)
        if out_of_time:
            break
    if distributed:
        dist.barrier()
    return row


def gather_sampler_states(sampler, distributed: bool) -> list[str]:
    """Every rank's sampler state (JSON), in rank order; a collective call under DDP."""
    states = [json.dumps(sampler.state())]
    if distributed:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, states[0])
        states = gathered
    return states


def _checkpoint(cfg, model, opt, sampler, step, run_dir, rank, distributed, command) -> None:
    states = gather_sampler_states(sampler, distributed)
    if rank != 0:
        return
    last = run_dir / "last"
    card = {"model": "VRP-SAM encoder", "backbone": model.backbone.id, "step": step,
            "trainable_parameters": sum(p.numel() for p in model.encoder.parameters()),
            "config": asdict(cfg), "command": command, "git_revision": git_revision(),
            "world_size": dist.get_world_size() if distributed else 1}
    save_encoder(model.encoder, last, card)
    tmp = last / "state.pt.tmp"
    torch.save({"optimizer": opt.state_dict(), "step": step, "sampler": states,
                "torch_rng": torch.get_rng_state()}, tmp)
    tmp.replace(last / "state.pt")
