"""Fine-tuning a trained VRP-SAM on a hospital's labelled scans (domain adaptation).

Starts from the shipped default model (or ``init``), adapts the VRP encoder and/or LoRA adapters
on the mask decoder (``vrpsam_med.models.lora``) with the episodes of meta-training
(``vrpsam_med.training.episodes``) on the *train* patients, and validates with the evaluate harness
(``vrpsam_med.evaluation.protocols.evaluate``) on held-out *val* patients every ``validation.every``
steps. ``RUN_DIR/best`` (best validation Dice) and ``RUN_DIR/last`` (with optimizer/sampler state for
resuming) hold ``vrp_encoder.safetensors`` [+ ``lora_decoder.safetensors``] + ``model_card.json``;
``RUN_DIR/log.csv`` logs training and validation; ``RUN_DIR/before_after.{md,json}`` compares the
start model with the best one. Re-running with the same RUN_DIR resumes (same seed -> same result).
DDP under torchrun: every rank samples its own episodes, gradients are averaged with all_reduce,
rank 0 validates and writes.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vrpsam_med.errors import UsageError
from vrpsam_med.evaluation.protocols import PROTOCOLS, EvalConfig, evaluate
from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.models.lora import LORA_FILE, LoRALinear, lora_parameters, save_lora, with_adapted_decoder
from vrpsam_med.models.vrp import VRPSAM, load_vrp
from vrpsam_med.training.config import _build, merge_overrides, read_yaml
from vrpsam_med.training.episodes import EpisodeConfig, EpisodeSampler
from vrpsam_med.training.train import (
    batch_to,
    forward_episodes,
    gather_sampler_states,
    git_revision,
    init_distributed,
    losses,
    mask_loss,
    save_encoder,
    training_uses_bf16,
)

log = logging.getLogger(__name__)
LOG_FIELDS = ["step", "seconds", "loss", "bce", "dice_loss", "presence", "dice", "box_loss", "box_dice", "val_dice"]


@dataclass
class LoRAConfig:
    decoder: bool = False  # LoRA adapters on the mask decoder's attention / MLP linears
    image_encoder: bool = False  # not supported yet (refused with an error; see docs/finetune.md)
    rank: int = 4
    alpha: float = 8.0


@dataclass
class BoxPromptConfig:
    """Box-prompt episodes: with decoder adapters, also train SAM's own box prompting on this data.

    The volume engine propagates with box prompts (the neighbour slice's box), so this is what
    adapts the engine itself to a new scanner; VRP episodes alone adapt the reference prompts.
    """

    weight: float = 1.0  # loss weight (0 = off); used only with lora.decoder
    batch_size: int = 4  # box episodes per step, besides the batch_size VRP episodes
    max_margin: float = 0.1  # boxes grow by a random share in [0, max_margin] of their size per side
    neighbour: int = 1  # the box comes from a slice up to this far away (as in propagation)
    p_past_end: float = 0.25  # share of boxes on the first slice past the structure's end: target empty
    p_larger: float = 0.0  # share of boxes from the largest slice within `neighbour`: the decoder must not fill the box


@dataclass
class ValidationConfig:
    protocol: str = "volume"  # evaluate harness protocol on the val patients: volume | fewshot
    method: str = "vrp"  # vrp (every slice from the reference alone) | engine (the volume engine; volume only)
    annotation: str = "mask"
    every: int = 50  # steps between validations (and checkpoints)
    max_cases: int = 3  # val patients evaluated (budget)
    patience: int = 4  # validations without improvement before stopping; 0 = never stop early
    min_delta: float = 0.0


@dataclass
class FinetuneConfig:
    dataset: str = ""  # MSD folder or CSV of image,label
    split: str = "train"  # cases of DIR to use (train + val come from these); 'all' or no split: every case
    labels: list[str] = field(default_factory=list)  # structures to adapt to (default: all)
    label_names: dict = field(default_factory=dict)  # CSV input: {value: name}
    modality: str = "unknown"  # CSV input: CT | MR | unknown
    init: str = ""  # model folder / RUN_DIR to start from ('' = the shipped default)
    train_encoder: bool = True
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    box_prompts: BoxPromptConfig = field(default_factory=BoxPromptConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    val_fraction: float = 0.25
    min_val_patients: int = 2
    min_train_patients: int = 1
    max_cases: int = 0  # use only the first N cases (0 = all)
    batch_size: int = 4
    lr: float = 5e-5
    weight_decay: float = 0.01
    max_steps: int = 400
    time_budget_s: float = 0.0  # 0 = no limit
    seed: int = 0
    presence_weight: float = 0.5
    bf16: bool | str = "auto"  # bf16 autocast: "auto" (where it is faster), true, false
    # With lora.decoder: refit the volume engine's stop rule for the adapted decoder on the train patients
    # at the end (vrpsam_med/engine/stop_rule.py), store it in best/ and validate best again with it.
    calibrate_stop_rule: bool = True
    # Volume-engine settings stored with the model (engine.json, vrpsam_med/engine/model_settings.py); e.g.
    # localised_box_margin: 0.1 for a decoder trained on loose boxes. Empty: the engine's defaults.
    engine: dict = field(default_factory=dict)
    max_memory_fraction: float = 0.8  # refuse to start when the estimate exceeds this share of free memory
    episodes: EpisodeConfig = field(default_factory=lambda: EpisodeConfig(p_supervoxel=0.2))


def load_finetune_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """YAML file, then overrides (dotted keys for sections, e.g. ``lora.rank``); errors name the bad key."""
    where = str(path) if path else "options"
    cfg = _build(FinetuneConfig, merge_overrides(read_yaml(path), overrides), where)
    for name in ("batch_size", "max_steps", "lora.rank", "validation.every", "validation.max_cases"):
        obj = cfg
        for part in name.split("."):
            obj = getattr(obj, part)
        if int(obj) < 1:
            raise UsageError(f"{where}: {name} must be >= 1")
    if cfg.lora.image_encoder:
        raise UsageError(f"{where}: lora.image_encoder: LoRA on the image encoder is not supported yet "
                         "(embeddings are cached; see docs/finetune.md); adapt the VRP encoder and lora.decoder")
    if not cfg.train_encoder and not cfg.lora.decoder:
        raise UsageError(f"{where}: nothing to train: set train_encoder: true and/or lora.decoder: true")
    from vrpsam_med.engine import model_settings

    try:
        model_settings.check(cfg.engine)
    except ValueError as exc:
        raise UsageError(f"{where}: engine: {exc}") from None
    if cfg.validation.protocol not in PROTOCOLS:
        raise UsageError(f"{where}: validation.protocol must be one of {', '.join(PROTOCOLS)}")
    if cfg.validation.method not in ("vrp", "engine"):
        raise UsageError(f"{where}: validation.method must be vrp or engine")
    if cfg.validation.method == "engine" and cfg.validation.protocol != "volume":
        raise UsageError(f"{where}: validation.method engine needs validation.protocol volume")
    bp = cfg.box_prompts
    if (bp.weight < 0 or bp.batch_size < 1 or bp.max_margin < 0 or bp.neighbour < 0
            or not 0 <= bp.p_past_end < 1 or not 0 <= bp.p_larger <= 1):
        raise UsageError(f"{where}: box_prompts: weight, max_margin and neighbour must be >= 0, batch_size >= 1, "
                         "p_past_end in [0, 1), p_larger in [0, 1]")
    if not 0 < cfg.val_fraction < 1:
        raise UsageError(f"{where}: val_fraction must lie in (0, 1)")
    if cfg.min_val_patients < 2:
        raise UsageError(f"{where}: min_val_patients must be >= 2 (the protocols need two patients)")
    if not 0 <= cfg.episodes.p_supervoxel <= 1 or not 0 <= cfg.episodes.p_negative < 1:
        raise UsageError(f"{where}: episode probabilities must lie in [0, 1]")
    return cfg


# -- memory -------------------------------------------------------------------------------------
#: bytes of activations kept for backward per episode and per VRP query, measured on CPU (fp32,
#: LiteMedSAM, 50 queries: ~350 MiB per episode; bf16 autocast needs less; docs/finetune.md)
_ACT_PER_EPISODE = 250 * 2**20
_ACT_PER_QUERY = 2 * 2**20


def estimate_memory(batch_size: int, num_queries: int, trainable: int, frozen: int, box_batch: int = 0) -> int:
    """Rough peak bytes of one training step: weights, AdamW state, activations, embeddings."""
    weights = 4 * (trainable + frozen) + 12 * trainable  # fp32 weights; grads + 2 AdamW moments
    # a box episode runs the decoder only: counted as half a VRP episode (an upper bound)
    acts = batch_size * (_ACT_PER_EPISODE + num_queries * _ACT_PER_QUERY) + box_batch * _ACT_PER_EPISODE // 2
    # + 3 GiB: Python, torch, the backbone, prepared cases, validation, and what glibc keeps mapped
    # (a lower bound: whole CHAOS MR runs at batch 4 on CPU peaked at 5.5-6.9 GiB RSS; docs/finetune.md)
    return int(weights + acts + 3 * 2**30)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil
    except ImportError:  # not a dependency: fall back to the kernel's count of free pages
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return int(psutil.virtual_memory().available)


def check_memory(cfg: FinetuneConfig, model: VRPSAM, trainable: list[torch.nn.Parameter], device: torch.device) -> int:
    n_train = sum(p.numel() for p in trainable)
    n_frozen = sum(p.numel() for p in model.parameters()) - n_train
    need = estimate_memory(cfg.batch_size, model.encoder.num_queries, n_train, n_frozen,
                           cfg.box_prompts.batch_size if _box_prompts_on(cfg) else 0)
    have = available_memory(device)
    if need > cfg.max_memory_fraction * have:
        gib = 2**30
        raise UsageError(
            f"estimated peak memory {need / gib:.1f} GiB (batch_size={cfg.batch_size}, "
            f"{model.encoder.num_queries} queries, {n_train:,} trainable parameters"
            f"{', LoRA rank ' + str(cfg.lora.rank) if cfg.lora.decoder else ''}) exceeds "
            f"{cfg.max_memory_fraction:.0%} of the free {'GPU' if device.type == 'cuda' else ''} memory "
            f"({have / gib:.1f} GiB): lower --batch-size, or close other programs")
    return need


def _box_prompts_on(cfg: FinetuneConfig) -> bool:
    return cfg.lora.decoder and cfg.box_prompts.weight > 0


# -- model --------------------------------------------------------------------------------------
def build_model(cfg: FinetuneConfig, backbone: torch.nn.Module, start: str | Path | None
                ) -> tuple[VRPSAM, list[torch.nn.Parameter]]:
    """The start model (with fresh LoRA adapters when asked) and its trainable parameters."""
    torch.manual_seed(cfg.seed)
    model = load_vrp(backbone, start)
    model.engine_settings = {**model.engine_settings, **cfg.engine}  # validation uses them too
    has_lora = any(isinstance(m, LoRALinear) for m in model.backbone.mask_decoder.modules())
    if cfg.lora.decoder and not has_lora:
        model.backbone = with_adapted_decoder(model.backbone, cfg.lora.rank, cfg.lora.alpha)
    model.backbone.requires_grad_(False)
    model.encoder.requires_grad_(cfg.train_encoder)
    params = list(model.encoder.parameters()) if cfg.train_encoder else []
    if cfg.lora.decoder:
        for p in lora_parameters(model.backbone.mask_decoder):
            p.requires_grad_(True)
            params.append(p)
    return model.eval(), params


def save_model(model: VRPSAM, folder: Path, card: dict) -> None:
    """Encoder (+ decoder adapters when the model has them) + model card, as ``load_vrp`` reads them."""
    from vrpsam_med.engine import model_settings, stop_rule

    (folder / stop_rule.FILE).unlink(missing_ok=True)  # fitted for the decoder these weights replace
    settings = getattr(model, "engine_settings", {})
    if settings:
        model_settings.save(folder, settings)
    else:
        (folder / model_settings.FILE).unlink(missing_ok=True)
    save_encoder(model.encoder, folder, card)
    lora = [m for m in model.backbone.mask_decoder.modules() if isinstance(m, LoRALinear)]
    if lora:
        from vrpsam_med.models.lora import DEFAULT_TARGETS

        save_lora(model.backbone.mask_decoder, folder / LORA_FILE, lora[0].rank, lora[0].alpha, DEFAULT_TARGETS)
    else:
        (folder / LORA_FILE).unlink(missing_ok=True)


# -- validation ---------------------------------------------------------------------------------
def validate(cfg: FinetuneConfig, model: VRPSAM, val_ds: MSDDataset, cache: EmbeddingCache) -> dict:
    """Evaluate harness on the val patients -> {'mean_dice', 'per_label'}."""
    from vrpsam_med.engine.reference import ReferencePredictor

    v = cfg.validation
    ecfg = EvalConfig(protocol=v.protocol, annotation=v.annotation, labels=cfg.labels or None, split="val",
                      method=v.method, seed=cfg.seed, max_cases=v.max_cases)
    result = evaluate(val_ds, ecfg, cache, ReferencePredictor(model, cache), progress=False)
    return {"mean_dice": result.mean_dice, "per_label": result.per_label}


def before_after(history: list[dict], best_step: int, calibrated: dict | None = None) -> tuple[dict, str]:
    """Validation of the start model vs the best checkpoint (and vs best with its refitted stop rule):
    JSON and a markdown table."""
    before = history[0]
    after = next(h for h in history if h["step"] == best_step)
    names = list(before["per_label"])
    final = calibrated or after
    data = {"before": before, "after": after, "delta_mean_dice": final["mean_dice"] - before["mean_dice"]}
    head = f"| structure | before (step 0) | after (step {best_step}) |"
    if calibrated:
        data["after_stop_rule_refitted"] = calibrated
        head += " after, stop rule refitted |"
    lines = [head + " change |", "|---|---|---|" + "---|" * (2 if calibrated else 1)]
    for n in names + ["mean"]:
        cells = [h["mean_dice"] if n == "mean" else h["per_label"][n] for h in (before, after, calibrated) if h]
        lines.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in cells) + f" | {cells[-1] - cells[0]:+.3f} |")
    return data, "\n".join(lines) + "\n"


def calibrate_stop_rule(cfg: FinetuneConfig, run_dir: Path, ds: MSDDataset, cache: EmbeddingCache
                        ) -> dict | None:
    """Refit the engine's stop rule for ``run_dir/best``'s adapted decoder on the train patients, store it
    there (``stop_rule.json``) and validate best again with it -> the validation result (None when the
    train patients give too few slices to fit: best keeps the default rule)."""
    from vrpsam_med.engine import stop_rule
    from vrpsam_med.engine.segmenter import Segmenter

    model = load_vrp(cache.backbone, run_dir / "best")
    names = {v: n for v, n in ds.labels.items() if not cfg.labels or n in cfg.labels}
    train = ds.cases("train")
    cases = []
    for case in train:
        vol, lab = ds.load(case)
        if lab is not None:
            cases.append((vol, lab, names))
    t0 = time.perf_counter()
    try:
        rule, n = stop_rule.calibrate(Segmenter(model, cache=cache), cases)
    except ValueError as exc:
        log.warning("stop rule not refitted (%s): %s keeps the default rule", exc, run_dir / "best")
        (run_dir / "best" / stop_rule.FILE).unlink(missing_ok=True)
        return None
    stop_rule.save(run_dir / "best", rule, {"fitted_on": [c.case_id for c in train], "slices": n,
                                            "seconds": round(time.perf_counter() - t0, 1)})
    model.stop_rule = rule
    log.warning("stop rule refitted for the adapted decoder on %d slices: %s", n, rule)
    return validate(cfg, model, ds, cache)


# -- data ---------------------------------------------------------------------------------------
@dataclass
class CheckedData:
    """The opened dataset (with a train/val split), its train cases, and a description for the model card."""

    dataset: MSDDataset
    train: list
    info: dict


def check_data(cfg: FinetuneConfig) -> CheckedData:
    """Open + check the data and split it by patient; no model needed, so bad input fails fast."""
    from vrpsam_med.training.sources import check_cases, check_label_counts, open_source, split_by_patient, with_split

    if not cfg.dataset:
        raise UsageError("finetune: no dataset (give --dataset DIR or 'dataset' in the config)")
    ds = open_source(cfg.dataset, cfg.label_names, cfg.modality)
    names = list(cfg.labels) or list(ds.labels.values())
    for n in names:
        ds.label_value(n)  # unknown structure names fail here, with the list of known ones
    cases = ds.cases(cfg.split)
    cases = cases[: cfg.max_cases] if cfg.max_cases > 0 else cases
    checked = check_cases(ds, cases)
    train_c, val_c = split_by_patient(checked, cfg.val_fraction, cfg.min_val_patients, cfg.seed)
    check_label_counts(ds, train_c, val_c, names, cfg.min_train_patients, cfg.min_val_patients)
    info = {"dataset": str(cfg.dataset), "name": ds.name, "labels": names,
            "train_cases": [c.case.case_id for c in train_c], "val_cases": [c.case.case_id for c in val_c],
            "train_patients": sorted({c.patient for c in train_c}), "val_patients": sorted({c.patient for c in val_c})}
    return CheckedData(with_split(ds, train_c, val_c), [c.case for c in train_c], info)


def preflight(cfg: FinetuneConfig, backbone: torch.nn.Module) -> int:
    """Build the start model once and refuse (UsageError) when the memory estimate is too high."""
    model, params = build_model(cfg, backbone, cfg.init or None)
    return check_memory(cfg, model, params, backbone.device)


def prepare(cfg: FinetuneConfig, cache: EmbeddingCache, data: CheckedData | None = None
            ) -> tuple[list, MSDDataset, dict]:
    """Checked data -> (train records with cached embeddings, dataset with a train/val split, card info).

    Under torchrun rank 0 prepares first, the other ranks then read the same cache.
    """
    from vrpsam_med.training.data import prepare_case

    if cache.root is None:
        raise UsageError("finetune needs an on-disk embedding cache: drop --cache-dir none")
    data = data or check_data(cfg)
    rank, _, distributed = init_distributed()
    records = []
    for turn in ((0, 1) if distributed else (0,)):
        if (rank == 0) == (turn == 0):
            records = [prepare_case(data.dataset, c, cache, cache.root.parent / "episodes") for c in data.train]
        if distributed:
            dist.barrier()
    return records, data.dataset, data.info


# -- training -----------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    step: int
    best_step: int
    stopped_early: bool
    history: list[dict]
    table: str


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def _log(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def finetune(cfg: FinetuneConfig, records: list, val_ds: MSDDataset, cache: EmbeddingCache, run_dir: Path,
             data_info: dict | None = None, command: str = "") -> FinetuneResult:
    """Fine-tune (or resume) in ``run_dir``; ``records`` are the train patients' prepared cases."""
    rank, world, distributed = init_distributed()
    backbone = cache.backbone
    device = backbone.device
    last = run_dir / "last"
    resuming = (last / "state.pt").exists()
    start = last if resuming else (cfg.init or None)
    model, params = build_model(cfg, backbone, start)
    if not params:
        raise UsageError("nothing to train (train_encoder is false and there are no LoRA adapters)")
    check_memory(cfg, model, params, device)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    exclude = [n for r in records for n in r.label_names.values() if cfg.labels and n not in cfg.labels]
    ep_cfg = EpisodeConfig(**{**asdict(cfg.episodes), "exclude": sorted(set(exclude) | set(cfg.episodes.exclude))})
    sampler = EpisodeSampler(records, ep_cfg, seed=cfg.seed * 1000 + rank)
    step, history, best_step, bad, stopped = 0, [], 0, 0, False
    if resuming:
        state = torch.load(last / "state.pt", map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sampler.set_state(json.loads(state["sampler"][rank]))
        torch.set_rng_state(state["torch_rng"])
        progress = json.loads(state["progress"])
        keys = ("step", "history", "best_step", "bad", "stopped")
        step, history, best_step, bad, stopped = (progress[k] for k in keys)
        if rank == 0:
            log.warning("resumed %s at step %d", run_dir, step)
    run_dir.mkdir(parents=True, exist_ok=True)
    use_bf16 = training_uses_bf16(cfg.bf16, device)
    card_base = {"model": "VRP-SAM encoder (fine-tuned)", "backbone": backbone.id,
                 "init": str(cfg.init or "shipped default (vrpsam_med/assets/vrp_default)"),
                 "data": data_info or {}, "config": asdict(cfg), "command": command, "git_revision": git_revision(),
                 "world_size": world, "lora_decoder": asdict(cfg.lora) if cfg.lora.decoder else None,
                 "trainable_parameters": sum(p.numel() for p in params)}

    def run_validation() -> None:
        nonlocal best_step, bad, stopped
        if rank == 0:
            m = validate(cfg, model, val_ds, cache)
            history.append({"step": step, **m})
            _log(run_dir / "log.csv", {"step": step, "seconds": round(time.perf_counter() - t0, 1),
                                       "val_dice": round(m["mean_dice"], 5)})
            best = next((h for h in history if h["step"] == best_step), None)
            if best is None or len(history) == 1 or m["mean_dice"] > best["mean_dice"] + cfg.validation.min_delta:
                best_step, bad = step, 0
                save_model(model, run_dir / "best", {**card_base, "step": step, "metrics": {"validation": m}})
            else:
                bad += 1
            stopped = cfg.validation.patience > 0 and bad >= cfg.validation.patience
        if distributed:
            shared = [best_step, bad, stopped]
            dist.broadcast_object_list(shared, src=0)
            best_step, bad, stopped = shared

    t0 = time.perf_counter()
    if not history:
        run_validation()  # the start model: the "before" column
        _checkpoint(model, opt, sampler, run_dir, rank, distributed, card_base,
                    {"step": step, "history": history, "best_step": best_step, "bad": bad, "stopped": stopped})
    while step < cfg.max_steps and not stopped:
        b = batch_to(sampler.batch(cfg.batch_size), device)
        logits, presence = forward_episodes(model.encoder, model.backbone, b, use_bf16)
        loss, metrics = losses(logits, presence, b, cfg.presence_weight)
        if _box_prompts_on(cfg):
            box_loss, metrics["box_loss"], metrics["box_dice"] = box_step(model, sampler, cfg, use_bf16)
            loss = loss + cfg.box_prompts.weight * box_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if distributed:
            _average_gradients(params, world)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        elapsed = time.perf_counter() - t0
        if rank == 0 and (step % 10 == 0 or step == 1):
            _log(run_dir / "log.csv", {"step": step, "seconds": round(elapsed, 1),
                                       **{k: round(v, 5) for k, v in metrics.items()}})
        out_of_time = cfg.time_budget_s > 0 and elapsed >= cfg.time_budget_s
        if step % cfg.validation.every == 0 or step == cfg.max_steps:
            run_validation()
        if step % cfg.validation.every == 0 or step == cfg.max_steps or out_of_time or stopped:
            _checkpoint(model, opt, sampler, run_dir, rank, distributed, card_base,
                        {"step": step, "history": history, "best_step": best_step, "bad": bad, "stopped": stopped})
        if out_of_time:
            break
    table = ""
    if rank == 0:
        calibrated = None
        if cfg.lora.decoder and cfg.calibrate_stop_rule:
            refit = calibrate_stop_rule(cfg, run_dir, val_ds, cache)
            calibrated = None if refit is None else {"step": best_step, **refit}
        data, table = before_after(history, best_step, calibrated)
        (run_dir / "before_after.json").write_text(json.dumps(data, indent=2))
        (run_dir / "before_after.md").write_text(table)
    if distributed:
        dist.barrier()
    return FinetuneResult(step, best_step, stopped, history, table)


def box_step(model: VRPSAM, sampler: EpisodeSampler, cfg: FinetuneConfig, use_bf16: bool
             ) -> tuple[torch.Tensor, float, float]:
    """Box-prompt episodes through the adapted decoder -> (loss, its value, hard Dice)."""
    from vrpsam_med.models.backbones import LOW_RES

    bp, bb = cfg.box_prompts, model.backbone
    b = sampler.box_batch(bp.batch_size, bp.max_margin, bp.neighbour, bp.p_past_end, bp.p_larger)
    emb, mask = b.tgt_emb.to(bb.device), b.tgt_mask.to(bb.device)
    with torch.autocast(bb.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        logits, _ = bb.decode(emb, bb.prompt_tokens(boxes=b.boxes.to(bb.device) * (bb.image_size / LOW_RES)))
    bce, dice_loss, hard = mask_loss(logits, mask, (mask.sum(dim=(1, 2, 3)) > 0).float())
    loss = bce + dice_loss
    return loss, float(loss.detach()), hard


def _checkpoint(model, opt, sampler, run_dir: Path, rank: int, distributed: bool, card_base: dict,
                progress: dict) -> None:
    states = gather_sampler_states(sampler, distributed)
    if rank != 0:
        return
    last = run_dir / "last"
    metrics = {"validation": progress["history"][-1] if progress["history"] else None,
               "best_step": progress["best_step"]}
    save_model(model, last, {**card_base, "step": progress["step"], "metrics": metrics})
    tmp = last / "state.pt.tmp"
    torch.save({"optimizer": opt.state_dict(), "sampler": states, "torch_rng": torch.get_rng_state(),
                "progress": json.dumps(progress)}, tmp)
    tmp.replace(last / "state.pt")
