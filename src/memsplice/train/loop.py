"""The formation recipe: setup, train step, evaluate, save, cleanup, written out.

    recipe = FormationRecipe(TrainConfig.from_yaml("configs/formation-smollm2.yaml"), resume=True)
    recipe.setup()
    summary = recipe.train()      # runs until run.steps (or the time budget), evaluating and checkpointing
    recipe.cleanup()

What one step does (every objective with a positive weight, on its own batch, in one forward through
`FormationObjective` so DDP sees one graph):
    passages (B, T) --encoder--> latents (B, M, d) --gate, projections--> per-layer K/V (B, H, M, D)
    frozen reasoner reads [K/V][instruction] passage --> hidden states at the T target positions
    --LM head in chunks--> cross-entropy; backward reaches the encoder, gate and projections only.

Guarantees:
- The reasoner is frozen and checked: no parameter requires grad before and after training, and its weights digest
  is the same at the end as at the start (the run fails loudly otherwise).
- One code path for a single CPU process, one GPU, and torchrun over several (DDP over the memory weights only);
  only rank 0 writes files and shows progress.
- Checkpoints are atomic and a resumed run continues exactly (see `memsplice.train.state`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..devices import synchronize
from ..memory.config import MemoryConfig
from ..memory.model import MemoryModel
from . import objectives as obj
from .config import TrainConfig
from .data import PassageSource, corpus_tokens, fact_tokens, heldout_passages
from .distributed import DistInfo, all_reduce_sum, broadcast_object, init_distributed, teardown
from .evaluate import reconstruction_fidelity
from .fast_reader import FastReader, fast_reading
from .flops import ReasonerCost, encoder_flops, peak_flops, reasoner_read_flops
from .fused_attention import fused_memory_attention
from .plots import MetricsLog, plot_curves
from .state import TrainState, latest_checkpoint, load_trainer_file, save_checkpoint, set_rng_state

logger = logging.getLogger(__name__)

PROBE_STEPS = 40
"""Steps timed, one by one, to turn run.plan_minutes into a step count (see `StepTimes`)."""


def batch_shapes(batches: dict) -> tuple:
    """The shapes of one step's batches, per objective: a step with shapes not seen before pays for compiling them."""
    key = []
    for name, b in sorted(batches.items()):
        if isinstance(b, torch.Tensor):
            tensors = (b,)
        elif isinstance(b, tuple):
            tensors = b
        else:
            tensors = tuple(v for v in vars(b).values() if isinstance(v, torch.Tensor))
        key.append((name, tuple(tuple(t.shape) for t in tensors)))
    return tuple(key)


def _fresh_window(t: float) -> dict:
    """An empty metrics window opened at time `t`: what `_accumulate` adds steps to and `_flush` turns into a record."""
    return {
        "t": t,
        "steps": 0,
        "flops": 0.0,
        "tokens": 0,
        "losses": {},
        "correct": 0,
        "targets": 0,
        "new_shapes": False,  # a step in it ran at batch shapes new to this process (it paid for compiling them)
    }


class StepTimes:
    """Seconds per step for planning a schedule, from the probe's steps minus each first step of a set of shapes.

    The first step at new shapes pays for compilation (`run.compile`: one static graph per passage length) and
    allocator warm-up. On a mix of passage lengths many of the first steps are such steps; averaging them in once
    planned 155 steps for a 7-minute schedule on an H200 (six lengths; its first 10 steps took 119 s, its steps after
    step 40 about 0.2 s each). Steps at shapes already seen are what the rest of the run looks like. When no step
    repeated its shapes (e.g. denoising, whose corrupted lengths vary), the median of all steps is used."""

    def __init__(self):
        self._seen: set = set()
        self._repeat: list[float] = []
        self._all: list[float] = []

    def add(self, shapes: tuple, seconds: float) -> None:
        self._all.append(seconds)
        if shapes in self._seen:
            self._repeat.append(seconds)
        self._seen.add(shapes)

    def seconds_per_step(self) -> float:
        if self._repeat:
            return sum(self._repeat) / len(self._repeat)
        return sorted(self._all)[len(self._all) // 2]


class FormationObjective(nn.Module):
    """All weighted objectives of one step as one module call (what DDP wraps)."""

    def __init__(self, memory_model: MemoryModel, config: TrainConfig, instruction: torch.Tensor):
        super().__init__()
        self.memory = memory_model
        self.weights = config.objectives
        self.register_buffer("instruction", instruction, persistent=False)

    def forward(self, batches: dict) -> tuple[torch.Tensor, dict]:
        w = self.weights
        total, stats = None, {}
        for name, weight in (
            ("reconstruction", w.reconstruction),
            ("continuation", w.continuation),
            ("denoising", w.denoising),
            ("infonce", w.infonce),
        ):
            if weight <= 0:
                continue
            b = batches[name]
            if name == "reconstruction" and w.refined_target > 0:
                result, distance = obj.reconstruction_with_target(
                    self.memory, b, self.instruction, w.refined_target_steps, w.refined_target_lr
                )
                total = (
                    w.refined_target * distance.loss
                    if total is None
                    else total + w.refined_target * distance.loss
                )
                stats["refined_target"] = distance
            elif name == "reconstruction":
                result = obj.reconstruction(self.memory, b, self.instruction)
            elif name == "continuation":
                result = obj.continuation(self.memory, *b)
            elif name == "denoising":
                result = obj.denoising(self.memory, b, self.instruction)
            else:
                result = obj.infonce(self.memory, b, w.infonce_temperature)
            total = weight * result.loss if total is None else total + weight * result.loss
            stats[name] = result
        return total, stats


@dataclass
class StepCost:
    flops: float
    passages: int
    tokens: int


def _param_groups(memory: MemoryModel, config: TrainConfig) -> list[dict]:
    o = config.optim
    groups = {
        "encoder_decay": [],
        "encoder_no_decay": [],
        "operator_decay": [],
        "operator_no_decay": [],
        "gate": [],
    }
    for name, p in memory.named_parameters():
        if name == "encoder.token_embedding":
            continue  # added as its own group when untied
        if name.startswith("gate."):
            groups["gate"].append(p)
        elif name.startswith("operator."):
            groups["operator_decay" if p.ndim >= 2 else "operator_no_decay"].append(p)
        else:
            decay = p.ndim >= 2 and not name.endswith(("position", "slots"))
            groups["encoder_decay" if decay else "encoder_no_decay"].append(p)
    scale = {
        "operator_decay": o.operator_lr_scale,
        "operator_no_decay": o.operator_lr_scale,
        "gate": o.gate_lr_scale,
    }
    return [
        {
            "params": ps,
            "name": n,
            "lr_scale": scale.get(n, 1.0),
            "weight_decay": o.weight_decay if n.endswith("_decay") and not n.endswith("no_decay") else 0.0,
        }
        for n, ps in groups.items()
        if ps
    ]


def learning_rate(config: TrainConfig, step: int, planned: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at `planned` steps."""
    o = config.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, planned - o.warmup_steps))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class FormationRecipe:
    """Offline training of the memory encoder and injection projections against a frozen reasoner."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        init_from: str | Path | None = None,
        continue_schedule: bool = False,
        reasoner=None,
        show_progress: bool = True,
    ):
        """resume: continue exactly from the latest checkpoint in run.output_dir (fresh start when there is none).
        init_from: start from these memory weights with a new optimizer; with `continue_schedule`, also take the
        step and schedule recorded in them (an export of an interrupted run) and re-warm the learning rate."""
        if continue_schedule and not init_from:
            raise ValueError("--continue-schedule needs --init-from")
        self.config = config
        self.resume = resume
        self.init_from = Path(init_from) if init_from else None
        self.continue_schedule = continue_schedule
        self.rewarm_from: int | None = None
        self.reasoner = reasoner
        self.show_progress = show_progress
        self.output_dir = Path(config.run.output_dir)
        self.dist: DistInfo | None = None

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        self.dist = init_distributed(cfg.run.device)
        torch.manual_seed(cfg.run.seed)
        if self.reasoner is None:
            from ..reasoner import load_reasoner

            self.reasoner = load_reasoner(
                cfg.run.reasoner, device=self.dist.device, dtype=cfg.run.reasoner_dtype
            )
        elif self.reasoner.device != self.dist.device:
            self.reasoner.to(self.dist.device)
        self.device = self.reasoner.device
        self.reasoner_digest = self.reasoner.weights_digest()
        tok = self.reasoner.require_tokenizer()

        ckpt = latest_checkpoint(self.output_dir) if self.resume else None
        if self.resume and ckpt is None:
            logger.info("no checkpoint under %s; starting a fresh run", self.output_dir)
        if ckpt is not None:
            self.memory = MemoryModel.from_pretrained(ckpt / "memory", reasoner=self.reasoner)
        elif self.init_from is not None:
            self.memory = MemoryModel.from_pretrained(self.init_from, reasoner=self.reasoner)
        else:
            self.memory = MemoryModel(MemoryConfig.from_dict(cfg.memory.to_dict()), self.reasoner)
        # what the fidelity bench needs to read this memory back the way it was trained
        self.memory.config.reconstruction_instruction = cfg.data.instruction
        self.memory.config.extra = {
            **self.memory.config.extra,
            "trained_with": "memsplice train",
            "instruction": cfg.data.instruction,
            "data_sources": list(cfg.data.sources),
        }
        self.memory.train()

        # data
        self.train_tokens = corpus_tokens(tok, cfg.data, "train")
        self.heldout_tokens = corpus_tokens(tok, cfg.data, "heldout")
        facts = None
        if "facts" in cfg.data.synthetic_kinds and cfg.data.synthetic_fraction > 0:
            facts = fact_tokens(tok, cfg.run.seed, 20 * max(cfg.data.lengths) + 50_000)
        mask_id = tok.unk_token_id if tok.unk_token_id is not None else (tok.pad_token_id or 0)
        self.source = PassageSource(
            self.train_tokens,
            cfg.data,
            cfg.objectives,
            seed=cfg.run.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            fact_stream=facts,
            mask_token_id=mask_id,
        )
        instruction = tok(cfg.data.instruction, add_special_tokens=False)["input_ids"]
        if not instruction:
            raise ValueError("data.instruction must tokenize to at least one token")
        self.instruction = torch.tensor(instruction, dtype=torch.long, device=self.device)
        self.eval_sets = {
            n: heldout_passages(self.heldout_tokens, n, cfg.run.eval_passages) for n in cfg.run.eval_lengths
        }

        # state, optimizer, resume
        self.state = TrainState(planned_steps=cfg.run.steps)
        payload = load_trainer_file(ckpt) if ckpt is not None else None
        if payload is not None:
            self.state = TrainState.from_dict(payload["state"])
        elif self.init_from is not None and self.continue_schedule:
            recorded = self.memory.config.extra.get("train_state") or {}
            if "step" not in recorded:
                raise ValueError(f"{self.init_from} records no training step; drop --continue-schedule")
            self.state = TrainState.from_dict(recorded)
            self.rewarm_from = self.state.step
            logger.info(
                "continuing the schedule of %s at step %d of %s",
                self.init_from,
                self.state.step,
                self.state.planned_steps,
            )
        if self.state.embedding_untied and self.memory.encoder.embedding_tied:
            self.memory.encoder.untie_embedding()
        self.objective = FormationObjective(self.memory, cfg, self.instruction).to(self.device)
        self.optimizer = self._build_optimizer()
        if payload is not None:
            self.optimizer.load_state_dict(payload["optimizer"])
            set_rng_state(payload["rng"])
            logger.info("resumed from %s at step %d", ckpt, self.state.step)
        self.stage = None
        self._apply_stage()
        self.reader = self._fast_reader()
        self._compile()
        self.cost = ReasonerCost.from_reasoner(self.reasoner)
        self.peak = peak_flops(self.device)
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "train_config.yaml").write_text(cfg.to_yaml())
            self.metrics = MetricsLog(
                self.output_dir / "metrics.jsonl",
                resume_step=self.state.step if payload is not None else None,
            )
        self.autocast = self.device.type == "cuda" and cfg.run.autocast

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        groups = _param_groups(self.memory, self.config)
        if not self.memory.encoder.embedding_tied:
            groups.append(
                {
                    "params": [self.memory.encoder.token_embedding],
                    "name": "embedding",
                    "lr_scale": 1.0,
                    "weight_decay": 0.0,
                }
            )
        kwargs = {"fused": True} if self.device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **kwargs)

    def _stage_at(self, step: int) -> str:
        planned = self.state.planned_steps or self.config.run.steps
        frac = self.config.run.stage2_fraction
        if (
            frac > 0
            and self.memory.config.encoder_type == "transformer"
            and step >= int(planned * (1 - frac))
        ):
            return "reading"
        return "retention"

    def _apply_stage(self) -> None:
        """Freeze the encoder in the reading stage; (re)wrap DDP whenever the trainable set changes."""
        stage = self._stage_at(self.state.step)
        if stage == self.stage:
            return
        for p in self.memory.encoder.parameters():
            p.requires_grad_(stage == "retention")
        self.stage = stage
        self._wrap()
        if self.dist.is_main and self.state.step > 0:
            logger.info("step %d: stage %s", self.state.step, stage)

    def _wrap(self) -> None:
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            w = self.config.objectives
            unused = (
                w.reconstruction == w.continuation == w.denoising == 0
            )  # InfoNCE alone skips the projections
            self.model = DistributedDataParallel(
                self.objective,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
                find_unused_parameters=unused,
            )
        else:
            self.model = self.objective

    def _fast_reader(self) -> FastReader | None:
        r = self.config.run
        if not r.fast_reader:
            return None
        why = FastReader.refusal(self.reasoner)
        if why:
            logger.info("training reads go through the transformers decoder: %s", why)
            return None
        return FastReader(
            self.reasoner,
            compile=r.compile == "all",
            static_shapes=r.reader_shapes == "static",
            attention=r.reader_attention,
            compile_mode=r.compile_mode,
        )

    def _compile(self) -> None:
        mode = self.config.run.compile
        if mode == "none":
            return
        # the encoder and the transformers decoder layers compile one static graph per (rows, length) shape:
        # training lengths and the evaluation lengths each add one, more than dynamo's default of 8 recompilations
        # per function. The fast reader's layer function follows run.reader_shapes: dynamo's default ("auto": after
        # its second shape it recompiles with the changed dims dynamic) or one static graph per shape ("static")
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        self.memory.encoder.compile(dynamic=False)
        if mode == "all" and self.reader is None:  # the fast reader compiles its own layer function
            for layer in self.reasoner.decoder.layers:
                layer.compile(dynamic=False)

    # -- one step ----------------------------------------------------------------------------------------------
    def _batches(self, step: int) -> dict:
        w, s, dev = self.config.objectives, self.source, self.device
        out = {}
        if w.reconstruction > 0:
            out["reconstruction"] = s.reconstruction(step).to(dev)
        if w.continuation > 0:
            out["continuation"] = tuple(t.to(dev) for t in s.continuation(step))
        if w.denoising > 0:
            b = s.denoising(step)
            b.passage, b.corrupted, b.corrupted_mask = (
                b.passage.to(dev),
                b.corrupted.to(dev),
                b.corrupted_mask.to(dev),
            )
            out["denoising"] = b
        if w.infonce > 0:
            b = s.pairs(step)
            b.query, b.query_mask, b.passage = b.query.to(dev), b.query_mask.to(dev), b.passage.to(dev)
            out["infonce"] = b
        return out

    def _step_cost(self, batches: dict) -> StepCost:
        """FLOPs, passages and passage tokens of this rank's step (see memsplice.train.flops)."""
        m, i = self.memory.config.num_slots, self.instruction.numel()
        flops, passages, tokens = 0.0, 0, 0
        cfg = self.memory.config
        reads_reasoner = cfg.encoder_type == "causal_pool" or cfg.encoder_reasoner_states

        def encode(rows, n):
            nonlocal flops, passages, tokens
            flops += encoder_flops(self.memory, rows, n)
            if reads_reasoner:  # the reasoner's own forward pass over the passage, no gradient
                flops += 0.5 * reasoner_read_flops(self.cost, rows, 0, n, 0)
            passages += rows
            tokens += rows * n

        if "reconstruction" in batches:
            b, t = batches["reconstruction"].shape
            encode(b, t)
            # the read itself, plus one more for each refinement step of the refined-latent target
            reads = 1 + (
                self.config.objectives.refined_target_steps
                if self.config.objectives.refined_target > 0
                else 0
            )
            flops += reads * reasoner_read_flops(self.cost, b, m, i + t, t)
        if "continuation" in batches:
            ctx, follow = batches["continuation"]
            encode(*ctx.shape)
            flops += reasoner_read_flops(
                self.cost, follow.shape[0], m, follow.shape[1] - 1, follow.shape[1] - 1
            )
        if "denoising" in batches:
            d = batches["denoising"]
            encode(*d.corrupted.shape)
            b, t = d.passage.shape
            flops += reasoner_read_flops(self.cost, b, m, i + t, t)
        if "infonce" in batches:
            p = batches["infonce"]
            encode(*p.query.shape)
            encode(*p.passage.shape)
        return StepCost(flops, passages, tokens)

    def _autocast(self):
        if self.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict:
        """One optimizer step at `self.state.step`; returns this rank's numbers (tensors stay on the device)."""
        cfg, step = self.config, self.state.step
        if (
            self.memory.encoder.embedding_tied
            and self.memory.config.encoder_type == "transformer"
            and step >= self.memory.config.embed_warmup_updates
        ):
            self._untie_embedding()
        self._apply_stage()
        lr = learning_rate(cfg, step, self.state.planned_steps or cfg.run.steps)
        if self.rewarm_from is not None and cfg.run.rewarm_steps:
            lr *= min(1.0, (step - self.rewarm_from + 1) / cfg.run.rewarm_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        batches = self._batches(step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.reader is not None:
            self.reader.mark_step_begin()
        with (
            self._autocast(),
            fused_memory_attention(self.reasoner, cfg.run.fused_attention),
            fast_reading(self.reader),
        ):
            loss, stats = self.model(batches)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            if cfg.optim.grad_clip > 0
            else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        )
        self.optimizer.step()
        cost = self._step_cost(batches)
        self.state.step += 1
        return {
            "shapes": batch_shapes(batches),
            "loss": loss.detach(),
            "stats": stats,
            "lr": lr,
            "grad_norm": grad_norm.detach(),
            "cost": cost,
        }

    def _untie_embedding(self) -> None:
        emb = self.memory.encoder.untie_embedding()
        self.optimizer.add_param_group(
            {
                "params": [emb],
                "name": "embedding",
                "lr_scale": 1.0,
                "weight_decay": 0.0,
                "lr": self.optimizer.param_groups[0]["lr"],
            }
        )
        self.state.embedding_untied = True
        self.stage = None  # force a DDP re-wrap: the trainable set changed
        logger.info("step %d: untied the encoder's token embedding", self.state.step)

    # -- evaluation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out reconstruction fidelity per eval length (rank 0 computes; others wait)."""
        self.memory.eval()
        out = {}
        if self.dist.is_main:
            with self._autocast(), fused_memory_attention(self.reasoner, self.config.run.fused_attention):
                for n, passages in self.eval_sets.items():
                    f = reconstruction_fidelity(
                        self.reasoner,
                        self.memory,
                        passages,
                        self.instruction,
                        batch_rows=max(1, min(64, 16384 // n)),
                    )
                    out[str(n)] = {"accuracy": f.token_accuracy, "exact_match": f.exact_match}
        self.memory.train()
        out = broadcast_object(self.dist, out)
        self.state.last_eval = out
        return out

    # -- saving ------------------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """A training checkpoint (float32, with optimizer and RNG) under output_dir/checkpoints."""
        if not self.dist.is_main:
            return None
        return save_checkpoint(
            self.output_dir,
            self.memory,
            self.optimizer,
            self.state,
            self.config.to_yaml(),
            keep=self.config.run.keep_checkpoints,
        )

    def export(self) -> Path | None:
        """The final memory (run.save_dtype, sharded) at output_dir/memory, ready for from_pretrained."""
        if not self.dist.is_main:
            return None
        r = self.config.run
        dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[r.save_dtype]
        shard = int(r.save_shard_mb * 2**20) or None
        self.memory.config.extra["train_state"] = {
            k: v for k, v in self.state.to_dict().items() if k != "last_eval"
        }
        self.memory.config.extra["heldout_eval"] = self.state.last_eval
        return self.memory.save_pretrained(self.output_dir / "memory", dtype=dtype, max_shard_bytes=shard)

    # -- the loop ----------------------------------------------------------------------------------------------
    def _plan(self, seconds_per_step: float, seconds_left: float | None = None) -> None:
        """Size the schedule to run.plan_minutes at `seconds_per_step`; warn when the run's time limit
        (`seconds_left` of run.max_minutes / run.stop_at) will stop it before its learning rate has decayed."""
        minutes = self._plan_minutes
        steps = max(self.state.step + 1, int(0.92 * minutes * 60 / seconds_per_step))
        steps = broadcast_object(self.dist, steps)
        self.state.planned_steps = steps
        logger.info("planned %d steps (%.3f s/step for %.1f minutes)", steps, seconds_per_step, minutes)
        if seconds_left is not None:
            fit = self.state.step + int(seconds_left / seconds_per_step)
            if fit < steps:
                logger.warning(
                    "the time limit (run.max_minutes / run.stop_at) leaves about %.0f s: at %.3f s/step the "
                    "schedule stops near step %d of %d, before its learning rate has decayed; plan fewer minutes, "
                    "or continue it with --resume",
                    seconds_left,
                    seconds_per_step,
                    fit,
                    steps,
                )

    def train(self) -> dict:
        r = self.config.run
        start_wall = time.perf_counter()
        max_minutes, plan_minutes = r.max_minutes, r.plan_minutes
        if r.stop_at is not None:
            left = (r.stop_at - time.time()) / 60
            if left <= 0:
                raise ValueError(f"run.stop_at lies {-left:.1f} minutes in the past")
            max_minutes = min(max_minutes or left, left)
        self._plan_minutes = plan_minutes
        last_save = start_wall
        planning = plan_minutes is not None and self.state.step == 0
        bar = tqdm(
            total=self.state.planned_steps,
            initial=self.state.step,
            desc="formation",
            unit="step",
            disable=not (self.dist.is_main and self.show_progress),
            dynamic_ncols=True,
        )
        window = _fresh_window(time.perf_counter())
        self._shapes_seen: set = set()
        probe = StepTimes() if planning else None
        stopped_by_time = False
        while self.state.step < self.state.planned_steps:
            if probe is not None:
                self._sync()
                t0 = time.perf_counter()
            out = self.train_step()
            self._accumulate(window, out)
            if probe is not None:
                self._sync()
                probe.add(out["shapes"], time.perf_counter() - t0)
                if self.state.step == PROBE_STEPS:  # every rank plans at the same step; rank 0's plan is kept
                    left = None
                    if max_minutes is not None:
                        left = 60 * max_minutes - (time.perf_counter() - start_wall)
                    self._plan(probe.seconds_per_step(), left)
                    bar.total = self.state.planned_steps
                    probe = None
            bar.update(1)
            step = self.state.step
            if step % r.log_every == 0 or step == self.state.planned_steps:
                record = self._flush(window)
                self.state.train_seconds += record["seconds"]
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    acc=f"{record.get('accuracy/train', 0):.3f}",
                    mfu=f"{record.get('mfu', 0):.2f}" if "mfu" in record else None,
                    refresh=False,
                )
            if step >= self.state.planned_steps:
                break
            elapsed = time.perf_counter() - start_wall
            out_of_time = max_minutes is not None and elapsed > 60 * max_minutes
            eval_due = bool(r.eval_every) and step % r.eval_every == 0
            save_due = (
                out_of_time
                or (r.save_every_steps and step % r.save_every_steps == 0)
                or (time.perf_counter() - last_save) > 60 * r.save_every_minutes
            )
            if eval_due or save_due:
                self.state.train_seconds += self._flush(window)[
                    "seconds"
                ]  # keep eval and saving out of the timing
                if eval_due:
                    self._log_eval()
                if save_due:
                    self.save()
                    last_save = time.perf_counter()
                window["t"] = time.perf_counter()
            if out_of_time:
                stopped_by_time = True
                break
        bar.close()
        self._check_reasoner_unchanged()
        summary = {
            "step": self.state.step,
            "planned_steps": self.state.planned_steps,
            "finished": self.state.step >= self.state.planned_steps,
            "stopped_by_time": stopped_by_time,
        }
        summary["eval"] = self._log_eval()
        if not stopped_by_time:  # a stop by time has just saved
            self.save()
        self.export()
        summary["throughput"] = self._throughput_summary()
        if self.dist.is_main:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            plot_curves(
                self.metrics.read(),
                self.output_dir / "curves.png",
                title=f"memory formation ({self.memory.config.operator}, {self.memory.config.num_slots} slots)",
            )
        return summary

    def _sync(self) -> None:
        synchronize(self.device)

    def _accumulate(self, window: dict, out: dict) -> None:
        window["steps"] += 1
        if out["shapes"] not in self._shapes_seen:  # this window paid for compiling the step's shapes
            self._shapes_seen.add(out["shapes"])
            window["new_shapes"] = True
        window["flops"] += out["cost"].flops
        window["tokens"] += out["cost"].tokens
        self.state.passages_seen += out["cost"].passages * self.dist.world_size
        self.state.tokens_seen += out["cost"].tokens * self.dist.world_size
        window["losses"].setdefault("total", []).append(out["loss"])
        for name, res in out["stats"].items():
            window["losses"].setdefault(name, []).append(res.loss.detach())
            if name == "reconstruction":
                window["correct"] += res.correct
                window["targets"] += res.tokens
        window["lr"], window["grad_norm"] = out["lr"], out["grad_norm"]

    def _flush(self, window: dict) -> dict:
        """Turn the window into one metrics record (a device sync), write it on rank 0, reset the window."""
        if not window["steps"]:
            return {"loss": float("nan"), "seconds": 0.0}
        self._sync()
        now = time.perf_counter()
        seconds = now - window["t"]
        names = list(window["losses"])
        means = torch.stack([torch.stack(window["losses"][n]).float().mean() for n in names])
        correct = torch.as_tensor(window["correct"], device=self.device, dtype=torch.float64).reshape(1)
        extra = torch.tensor(
            [window["targets"], window["tokens"], window["flops"]], device=self.device, dtype=torch.float64
        )
        summed = all_reduce_sum(self.dist, torch.cat([means.double(), correct, extra]))
        k = len(names)
        means = (summed[:k] / self.dist.world_size).tolist()
        hits, targets, tokens, flops = summed[k:].tolist()
        record = {
            "kind": "train",
            "step": self.state.step,
            "lr": window["lr"],
            "grad_norm": float(window["grad_norm"]),
            "seconds": seconds,
            "loss": means[0],
            **{f"loss/{n}": v for n, v in zip(names[1:], means[1:], strict=True)},
            "tokens_per_s": tokens / seconds,
            "flops_per_s": flops / seconds,
            "tokens_seen": self.state.tokens_seen,
            "stage": self.stage,
        }
        if targets:
            record["accuracy/train"] = hits / targets
        if self.peak:
            record["mfu"] = flops / seconds / (self.peak * self.dist.world_size)
        if self.dist.is_main:
            self.metrics.write(record)
        self._windows = getattr(self, "_windows", []) + [{**record, "new_shapes": window["new_shapes"]}]
        window.update(_fresh_window(now))
        return record

    def _log_eval(self) -> dict:
        results = self.evaluate()
        if self.dist.is_main:
            record = {"kind": "eval", "step": self.state.step}
            for n, v in results.items():
                record[f"accuracy/{n}"] = v["accuracy"]
                record[f"exact_match/{n}"] = v["exact_match"]
            self.metrics.write(record)
            logger.info(
                "step %d held-out accuracy %s",
                self.state.step,
                {n: round(v["accuracy"], 4) for n, v in results.items()},
            )
        return results

    def _throughput_summary(self) -> dict:
        """Steady-state throughput: the metrics windows after the first (warm-up) in which no step ran at batch
        shapes new to this process (those pay for compiling them: one graph per passage length with `run.compile`,
        so on a mix of lengths such windows come long after the first two). When every window saw new shapes (e.g.
        denoising, whose corrupted lengths vary), the windows after the first two."""
        windows = getattr(self, "_windows", [])
        steady = [w for w in windows[1:] if not w.get("new_shapes")]
        if not steady:
            steady = windows[2:] if len(windows) > 3 else windows
        seconds = sum(w["seconds"] for w in steady)
        if not seconds:
            return {}
        tokens = sum(w["tokens_per_s"] * w["seconds"] for w in steady)
        flops = sum(w["flops_per_s"] * w["seconds"] for w in steady)
        out = {
            "tokens_per_s": tokens / seconds,
            "flops_per_s": flops / seconds,
            "seconds_measured": seconds,
            "windows_measured": len(steady),
            "windows_left_out": len(windows) - len(steady),
            "world_size": self.dist.world_size,
        }
        if self.peak:
            out["mfu"] = flops / seconds / (self.peak * self.dist.world_size)
            out["peak_flops_per_device"] = self.peak
        return out

    def _check_reasoner_unchanged(self) -> None:
        from ..reasoner.identity import assert_frozen

        assert_frozen(self.reasoner.model)
        if self.reasoner.weights_digest() != self.reasoner_digest:
            raise RuntimeError("the reasoner's weights changed during training; this is a bug in memsplice")

    def cleanup(self) -> None:
        if self.dist is not None:
            teardown(self.dist)
