"""`train(config)`: QLoRA fine-tuning of the multimodal LLM under DeepSpeed ZeRO, reading the store.

The recipe, in `Trainer.setup()` order:
  _setup_distributed  rank/world from the launcher (torchrun, deepspeed) or a single local process;
                      NCCL on GPUs, gloo on CPU
  _setup_model        base LLM (4-bit NF4 + double quantisation by default) + LoRA on all linear layers
                      (`train.lora`), + a projector (`train.projector`, `train.soft_tokens`) unless
                      `train.modality` is `text`; under ZeRO-3 loaded under `deepspeed.zero.Init`
  _setup_data         targets (`train.target`) joined with the modality's embedding from the store,
                      tokenised, sharded by rank, length-bucketed (`train.bucket_by_length`); the
                      step plan (training/schedule.py: warm-up, validation and checkpoint intervals
                      given in steps or as fractions of the run), with a one-line warning if they
                      do not fit it
  _setup_engine       AdamW (LoRA `train.lr`, projector `train.projector_lr`), warmup + linear decay,
                      DeepSpeed ZeRO `train.deepspeed_stage` (infra/deepspeed/zero<stage>.json)
  _resume             `train.resume`: model, optimizer, scheduler, data position, every rank's RNG and
                      the early-stop state from the latest complete checkpoint, so the loss curve
                      continues exactly

Then `train()`, a short loop over small parts tested alone: `_train_step` (the token-weighted loss of
training/loss.py over `train.grad_accum` micro-batches), validation loss on `train.eval_split` every
`train.eval_every` steps (best weights kept, early stop after `train.patience` validations without
improvement), an atomic checkpoint every `train.save_every` steps (training/checkpointer.py), metrics
summed over ranks in `runs/<name>/metrics.jsonl` (training/metrics.py), a progress bar with loss and
tokens/s. Outputs: `adapter/` (plain `PeftModel.from_pretrained` loads it), `projector.safetensors`,
`tokenizer/`, `config.yaml`, `run.json` (model, store version + tag, config hash).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import yaml

from featurestore.schema import TARGETS
from featurestore.store import Store
from infra.config import REPO_ROOT, MergConfig
from infra.errors import Interrupted
from infra.models import resolve_llm
from infra.progress import progress_bar
from training.checkpointer import Checkpointer, save_trained_weights
from training.data import collate, epoch_batches, load_examples, require_data
from training.loss import global_target_tokens, scaled_for_engine, target_tokens
from training.metrics import MetricLogger
from training.mllm import TOKENIZER_DIR, MultimodalLM, RunInfo, attach_lora, load_llm, resolve_dtype
from training.prompt import IGNORE_INDEX
from training.projector import Projector, ProjectorConfig
from training.schedule import plan_steps

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


@dataclass
class TrainReport:
    run_dir: Path
    steps: int
    train_loss: float | None
    best_val_loss: float | None
    tokens_per_s: float  # real (non-pad) tokens per second of training steps; validation and checkpoints excluded
    stopped_early: bool
    examples: int


def _single_process_rendezvous() -> str:
    """A file store in a fresh temporary folder: a port picked as free can be taken before the TCP store
    binds it (two runs at once failed with EADDRINUSE), a file of its own cannot."""
    folder = tempfile.mkdtemp(prefix="merg-rendezvous-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return f"file://{folder}/store"


@contextmanager
def _zero3_init(ds_config: dict):
    """While inside, `from_pretrained` builds the model under `deepspeed.zero.Init`: each rank loads only
    its partition. Not for 4-bit models: transformers 5 builds those on the meta device and fills them
    whole on every rank (`get_init_context`), and refuses the `device_map` bitsandbytes needs."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    alive = HfDeepSpeedConfig(ds_config)  # transformers holds a weak reference: keep it alive while loading
    try:
        yield alive
    finally:
        unset_hf_deepspeed_config()  # later loads in this process (evaluation, tests) are not partitioned


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def deepspeed_config(config: MergConfig, bf16: bool) -> dict:
    t = config.train
    path = t.deepspeed_config or REPO_ROOT / "infra" / "deepspeed" / f"zero{t.deepspeed_stage}.json"
    ds = {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}
    filled = dict(
        train_micro_batch_size_per_gpu=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        gradient_clipping=t.max_grad_norm,
    )  # fmt: skip
    for key, value in filled.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if ds.get("bf16", {}).get("enabled") == "auto":
        ds["bf16"]["enabled"] = bf16
    return ds


class Trainer:
    def __init__(self, config: MergConfig):
        self.config = config
        self.t = config.train
        self.run_dir = Path(config.paths.runs) / self.t.name
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_val: float | None = None
        self.bad_evals = 0
        self.tokens_seen = 0
        self._epoch_batches: tuple[int | None, list[list[int]]] = (None, [])

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        self._check_data()
        self._setup_distributed()
        self._setup_model()
        self._setup_data()
        self._setup_engine()
        if self.t.resume:
            self._resume()
        return self

    def _check_data(self) -> None:
        """Before anything loads: the store holds what this run trains on (else a DataError saying what
        to build), so that a run without its data stops in seconds, not after loading the model."""
        self.store = Store.open(self.config.paths.store, version=self.t.store_version)
        require_data(self.store, self.t, self.t.train_split, self._targets_version())

    def _setup_distributed(self) -> None:
        import deepspeed

        init_method = None
        if "RANK" not in os.environ:  # one local process: DeepSpeed would otherwise look for MPI
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "0")  # unused: the process group meets in a file
            init_method = _single_process_rendezvous()
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        deepspeed.init_distributed(
            dist_backend="nccl" if self.device.type == "cuda" else "gloo",
            init_method=init_method, rank=self.rank, world_size=self.world_size,
        )
        self.is_main = self.rank == 0
        random.seed(self.t.seed)
        np.random.seed(self.t.seed)
        torch.manual_seed(self.t.seed)

    def _setup_model(self) -> None:
        t = self.t
        self.model_path = resolve_llm(t.model, self.config.paths.model_cache)
        self.dtype = resolve_dtype(t.compute_dtype, self.device)
        self.ds_config = deepspeed_config(self.config, bf16=self.dtype == torch.bfloat16)
        rss_before = _peak_rss_mb()
        # 4-bit models cannot be built under ZeRO init (transformers refuses a device_map there, and builds
        # them whole on every rank anyway): deepspeed.initialize partitions them
        zero3_init = t.deepspeed_stage == 3 and t.quantization == "none"
        with _zero3_init(self.ds_config) if zero3_init else nullcontext():
            llm, self.tokenizer = load_llm(self.model_path, quantization=t.quantization, dtype=self.dtype, device=self.device)
        if t.deepspeed_stage == 3:  # every rank says what loading left it holding (the point of ZeRO-3 init)
            held = sum(getattr(p, "ds_tensor", p).numel() for p in llm.parameters())
            total = sum(getattr(p, "ds_numel", p.numel()) for p in llm.parameters())
            log.info(
                "rank %d loaded %s of %s parameter elements (%.0f%%); its peak RSS rose %.0f MB while loading",
                self.rank, f"{held:,}", f"{total:,}", 100 * held / max(1, total), _peak_rss_mb() - rss_before,
            )  # fmt: skip
        llm = attach_lora(llm, t.lora, gradient_checkpointing=t.gradient_checkpointing)
        self.store = Store.open(self.config.paths.store, version=t.store_version)
        projector = None
        if t.embedding_column:
            in_dim = self.store.fused_dim if t.embedding_column == "fused_emb" else self.store.embedding_dim
            self.projector_config = ProjectorConfig(in_dim, llm.config.hidden_size, t.soft_tokens, t.projector)
            projector = Projector(self.projector_config).to(self.device)
        self.model = MultimodalLM(llm, projector)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        self._log(
            f"model {self.model_path.name} ({t.quantization}, {self.dtype}), LoRA r={t.lora.r} on "
            f"{t.lora.target_modules}, modality {t.modality}"
            + (f", {t.projector} projector {self.projector_config.in_dim}->{t.soft_tokens}x{self.projector_config.hidden_size}" if projector else "")
            + f": {trainable:,} trainable of {total:,} parameters"
        )  # fmt: skip

    def _setup_data(self) -> None:
        t = self.t
        self.targets_version = self._targets_version()
        self.train_examples = load_examples(self.store, t, t.train_split, self.tokenizer, t.limit, self.targets_version)
        try:
            self.eval_examples = load_examples(self.store, t, t.eval_split, self.tokenizer, t.eval_limit, self.targets_version)
        except ValueError as exc:
            log.warning("no validation: %s", exc)
            self.eval_examples = []
        self.plan = plan_steps(t, len(self.train_examples), self.world_size)  # warm-up, validation, saves in steps
        self.batches_per_epoch, self.total_steps = self.plan.batches_per_epoch, self.plan.total_steps
        self._log(
            f"data: {len(self.train_examples)} {t.train_split} / {len(self.eval_examples)} {t.eval_split} "
            f"{t.target!r} examples from {self.store.root} v{self.store.version}; {self.world_size} process(es), "
            f"{self.batches_per_epoch} batches of {t.batch_size} per epoch per process; {self.plan.describe()}"
        )  # fmt: skip
        if (problems := self.plan.problems()) and self.is_main:
            log.warning("schedule: %s (give them as fractions of the run, e.g. eval_every: 0.1)", "; ".join(problems))

    def _targets_version(self) -> int | None:
        """The targets table's version every read of this run uses: `train.targets_version`, else the tag
        `train.store_version` names (a run tags both tables), else the latest."""
        t = self.t
        if not self.store.has_table(TARGETS):
            return None  # load_examples says what to build
        targets = self.store.lance_dataset(TARGETS)
        pin = t.targets_version
        if pin is None and t.store_version is not None:
            if not (isinstance(t.store_version, str) and t.store_version in targets.tags.list()):
                raise ValueError(
                    f"train.store_version={t.store_version!r} pins the utterances but not the targets table, which "
                    f"has no tag of that name: set train.targets_version too (run.json records the one a run read)"
                )
            pin = t.store_version
        return targets.checkout_version(pin).version if pin is not None else targets.version

    def _batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(
            self.train_examples, batch_size=self.t.batch_size, epoch=epoch, seed=self.t.seed,
            rank=self.rank, world_size=self.world_size, bucket=self.t.bucket_by_length,
        )  # fmt: skip

    def _setup_engine(self) -> None:
        import deepspeed

        t = self.t
        groups = [{"params": [p for n, p in self.model.llm.named_parameters() if p.requires_grad], "lr": t.lr}]
        if self.model.projector is not None:
            groups.append({"params": list(self.model.projector.parameters()), "lr": t.projector_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay)

        def schedule(step: int) -> float:  # linear warmup, then linear decay to 0
            warmup = self.plan.warmup_steps
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (self.total_steps - step) / max(1, self.total_steps - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.checkpointer = Checkpointer(self.engine, self.run_dir / CHECKPOINTS, keep=self.t.keep_checkpoints, rank=self.rank)

    # ---- checkpoints ----------------------------------------------------------------------------
    def _client_state(self) -> dict:
        return dict(
            step=self.step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch, best_val=self.best_val,
            bad_evals=self.bad_evals, tokens_seen=self.tokens_seen,
        )  # fmt: skip

    def _resume(self) -> None:
        loaded = self.checkpointer.load()
        if loaded is None:
            self._log(f"no checkpoint in {self.checkpointer.folder}: starting from step 0")
            return
        path, state = loaded
        for name in ("step", "epoch", "batch_in_epoch", "best_val", "bad_evals", "tokens_seen"):
            setattr(self, name, state[name])
        self._log(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    # ---- loop -----------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def validate(self) -> float | None:
        """Token-averaged loss on the validation examples (every rank takes a share)."""
        if not self.eval_examples:
            return None
        self.engine.eval()
        n, size = len(self.eval_examples), self.t.batch_size
        # pad the index list so every rank runs the same number of forward passes: under ZeRO-3 each
        # forward is a collective parameter gather, so a rank that skipped one would hang the others
        per_rank = -(-n // self.world_size)
        indices = np.arange(per_rank * self.world_size)[self.rank :: self.world_size]
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for start in range(0, len(indices), size):
            chunk = indices[start : start + size]
            batch = self._to_device(collate([self.eval_examples[i % n] for i in chunk], self.tokenizer.pad_token_id))
            keep = torch.as_tensor(chunk < n, device=self.device)
            out = self.engine(**{**batch, "labels": batch["labels"].masked_fill(~keep[:, None], IGNORE_INDEX)})
            totals += torch.stack([out.loss_sum.double(), totals.new_tensor(out.num_tokens)])
        torch.distributed.all_reduce(totals)
        self.engine.train()
        return (totals[0] / totals[1]).item() if totals[1] > 0 else None

    def _next_step_batches(self) -> list[list[int]]:
        """The `grad_accum` micro-batches of the next optimiser step (an epoch's end carries over)."""
        step_batches = []
        while len(step_batches) < self.t.grad_accum:
            if self._epoch_batches[0] != self.epoch:
                self._epoch_batches = (self.epoch, self._batches(self.epoch))
            batches = self._epoch_batches[1]
            if self.batch_in_epoch >= len(batches):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                continue
            step_batches.append(batches[self.batch_in_epoch])
            self.batch_in_epoch += 1
        return step_batches

    def _train_step(self) -> dict:
        """One optimiser step over `grad_accum` micro-batches, every target token weighed alike."""
        t = self.t
        started = time.perf_counter()
        micro_batches = [
            self._to_device(collate([self.train_examples[i] for i in indices], self.tokenizer.pad_token_id))
            for indices in self._next_step_batches()
        ]  # fmt: skip
        step_tokens = global_target_tokens(sum(target_tokens(b["labels"]) for b in micro_batches), self.device)
        for batch in micro_batches:
            out = self.engine(**batch)
            self.engine.backward(scaled_for_engine(out.loss_sum, step_tokens, t.grad_accum, self.world_size))
            self.engine.step()  # DeepSpeed steps the optimizer after grad_accum micro-batches
            self.metrics.add_micro_batch(out.loss_sum, out.num_tokens, int(batch["attention_mask"].sum()))
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the step's time is all in
        record = self.metrics.end_step(time.perf_counter() - started)
        self.step += 1
        self.tokens_seen += record.pop("real_tokens")
        return {"step": self.step, "epoch": self.epoch, **record, "lr": self.engine.get_lr()[0]}

    def _patience_exhausted(self) -> bool:
        return self.t.patience is not None and self.bad_evals >= self.t.patience

    def train(self, until_step: int | None = None) -> TrainReport:
        """Run to `train.max_steps` / `train.epochs`; `until_step` stops early as if interrupted."""
        t = self.t
        if self.is_main:
            if self.step == 0:  # a fresh start (not a resume) replaces an earlier run of this name
                (self.run_dir / METRICS).unlink(missing_ok=True)
                shutil.rmtree(self.run_dir / CHECKPOINTS, ignore_errors=True)
            self._write_run_files()
        self.engine.train()
        self.metrics = MetricLogger(self.run_dir / METRICS, self.device, is_main=self.is_main, from_step=self.step)
        stopped_early = self._patience_exhausted()  # a resumed run that had stopped stays stopped
        last_loss, first_step = None, self.step
        with progress_bar(f"train {t.name}", self.total_steps) as advance:
            advance(self.step)
            while self.step < self.total_steps and not stopped_early and (until_step is None or self.step < until_step):
                record = self._train_step()
                last_loss = record["loss"]
                advance(1, info=f"loss {last_loss:.3f}  {self.metrics.tokens_per_s:,.0f} tok/s")
                if self.step % t.log_every == 0:
                    record["tokens_per_s"] = self.metrics.tokens_per_s
                    self.metrics.reset_window()
                if self.step % self.plan.eval_every == 0 or self.step == self.total_steps:
                    record.update(self._evaluate_and_keep_best())
                    stopped_early = self._patience_exhausted()
                self.metrics.write(record)
                if self.step % self.plan.save_every == 0:
                    self.checkpointer.save(self.step, self._client_state())
        self.metrics.close()
        finished = self.step >= self.total_steps or stopped_early
        if finished and self.step > first_step:
            if self.step % self.plan.save_every:  # so that --resume of a finished run does nothing
                self.checkpointer.save(self.step, self._client_state())
            if self.best_val is None:  # no validation split: keep the last weights
                save_trained_weights(self.engine, self.run_dir, rank=self.rank)
        if self.is_main:
            self._write_run_files()
        if stopped_early:
            self._log(f"early stop at step {self.step}: no improvement in {t.patience} validations")
        return TrainReport(
            self.run_dir, self.step, last_loss, self.best_val, self.metrics.run_tokens_per_s, stopped_early,
            len(self.train_examples),
        )  # fmt: skip

    def _evaluate_and_keep_best(self) -> dict:
        val = self.validate()
        if val is None:
            return {}
        improved = self.best_val is None or val < self.best_val
        if improved:
            self.best_val, self.bad_evals = val, 0
            save_trained_weights(self.engine, self.run_dir, rank=self.rank)
        else:
            self.bad_evals += 1
        self._log(f"step {self.step}: {self.t.eval_split} loss {val:.4f} (ppl {math.exp(min(val, 50)):.2f})" + (" best" if improved else ""))
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50))}

    def _write_run_files(self) -> None:
        t = self.t
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(self.run_dir / TOKENIZER_DIR)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False))
        store_tag = None
        if self.store.pinned is None:
            store_tag = "train-" + re.sub(r"[^A-Za-z0-9_-]", "-", t.name)
            self.store.tag(store_tag, self.store.version)
            if self.targets_version is not None:  # the same tag on the targets table: pinning it pins both
                tags = self.store.lance_dataset(TARGETS).tags
                (tags.update if store_tag in tags.list() else tags.create)(store_tag, self.targets_version)
        RunInfo(
            name=t.name, model=str(self.model_path), modality=t.modality, embedding_column=t.embedding_column,
            quantization=t.quantization, system_prompt=t.system_prompt,
            soft_tokens=t.soft_tokens if self.model.projector is not None else 0, max_length=t.max_length,
            projector=vars(self.projector_config) if self.model.projector is not None else None,
            store=str(self.store.root), store_version=self.store.version, store_tag=store_tag or str(self.store.pinned),
            targets=t.target, targets_version=self.targets_version,
            config_hash=self.config.fingerprint(), merg_version=metadata.version("merg"), steps=self.step,
            best_val_loss=self.best_val,
        ).save(self.run_dir)  # fmt: skip

    def _log(self, message: str) -> None:
        if self.is_main:
            log.info(message)


class _Signalled(KeyboardInterrupt):
    def __init__(self, number: int):
        super().__init__(signal.Signals(number).name)
        self.number = number


@contextmanager
def _signals_interrupt():
    """While inside, SIGINT and SIGTERM interrupt the run as an exception (SIGTERM would otherwise end
    the process without a word); the previous handlers come back after. Only the main thread can."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(number, _frame):
        raise _Signalled(number)

    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def train(config: MergConfig, until_step: int | None = None) -> TrainReport:
    """Build the trainer from `config` and run it (the door `merg train` calls). SIGINT or SIGTERM stops
    it with `infra.errors.Interrupted`, saying the step reached and the checkpoint `--resume` starts from."""
    trainer = Trainer(config)
    with _signals_interrupt():
        try:
            return trainer.setup().train(until_step=until_step)
        except _Signalled as stop:
            checkpoints = trainer.checkpointer.tags() if hasattr(trainer, "checkpointer") else []
            since = f"from checkpoint {checkpoints[-1].name}" if checkpoints else "no checkpoint yet: from step 0"
            raise Interrupted(f"interrupted at step {trainer.step} ({stop}); resume with --resume ({since})", stop.number) from stop
