"""Training an APT model on a text file, and the ``apt-hal train`` command.

* Data: the text is split into paragraphs (blank lines), each encoded as ``bos ... eos``, and the
  token stream is cut into a training part and a held-out tail. A batch is ``batch_size`` windows
  of ``seq_len`` tokens, at start positions taken in a seeded random order that is reshuffled
  every epoch (:class:`TokenWindows`); the data position is ``(epoch, cursor)``.
* Step: the model's own loss (``out.loss``: shifted cross-entropy plus the weighted MoE aux
  losses) under bf16 autocast where the device supports it, backward, gradient clipping, AdamW
  (weight decay on matrices only), a linear-warmup + cosine learning-rate schedule.
* Every ``eval_every`` steps: loss and perplexity on held-out windows. Every ``save_every`` steps
  and at the end: an atomic checkpoint (:mod:`apt_hal.models.checkpoint`) holding the weights and
  the training state: optimizer, scheduler, random generators, data position.
* Exact resume: restoring all of that, a run of 2k steps and a run of k steps resumed for k more
  give bit-identical weights on the CPU in fp32 (tests/test_train.py). The schedule's length is
  part of the run: give the first leg ``schedule_steps`` = the final step count.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import pathlib
import random
import re
import sys
import time
from typing import Mapping, Optional, TextIO

import torch

from apt_hal import device as hal_device
from apt_hal.cli_errors import EXIT_CODES_EPILOG, parse_device
from apt_hal.models import checkpoint as ckpt
from apt_hal.models.tokenizer import MIN_VOCAB_SIZE, Tokenizer

__all__ = ["TrainConfig", "TokenWindows", "TrainResult", "encode_text", "split_tokens", "lr_multiplier",
           "evaluate", "train"]

PRECISIONS = ("auto", "bf16", "fp32")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train (the model's own shape is its ModelConfig)."""

    steps: int = 300
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup: int = 20
    schedule_steps: Optional[int] = None  # length of the cosine; None: steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 4
    eval_fraction: float = 0.1
    save_every: int = 100
    keep_last: int = 3
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast where apt_hal.device.supports_bf16(), else fp32
    log_every: int = 10

    def __post_init__(self):
        positive = ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "save_every", "keep_last",
                    "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"TrainConfig: seq_len must be >= 2 (a window predicts tokens 2..S), got {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup < 0 or self.weight_decay < 0 or not self.grad_clip > 0:
            raise ValueError(f"TrainConfig: warmup and weight_decay must be >= 0 and grad_clip > 0, got warmup="
                             f"{self.warmup}, weight_decay={self.weight_decay}, grad_clip={self.grad_clip}")
        if self.schedule_steps is not None and self.schedule_steps < self.steps:
            raise ValueError(f"TrainConfig: schedule_steps ({self.schedule_steps}) must be >= steps ({self.steps})")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"TrainConfig: eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"TrainConfig: seed must be in [0, 2**32), got {self.seed}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig: precision must be one of {PRECISIONS}, got {self.precision!r}")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def encode_text(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """The token stream of ``text``: each paragraph (separated by blank lines) as ``bos ... eos``."""
    ids: list[int] = []
    for paragraph in re.split(r"\n\s*\n", text):
        if paragraph.strip():
            ids += tokenizer.encode(paragraph.strip(), bos=True, eos=True)
    if not ids:
        raise ValueError("the training text is empty")
    return torch.tensor(ids, dtype=torch.long)


def split_tokens(tokens: torch.Tensor, eval_fraction: float, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training part, held-out tail of ``eval_fraction`` of the tokens); each must hold a window."""
    n_eval = max(seq_len, round(len(tokens) * eval_fraction))
    if len(tokens) - n_eval < seq_len:
        raise ValueError(f"the text has {len(tokens)} tokens: too few for training and held-out windows of "
                         f"seq_len={seq_len} (need at least {2 * seq_len}); use more text or a smaller seq_len")
    return tokens[:-n_eval], tokens[-n_eval:]


class TokenWindows:
    """Batches of ``seq_len``-token windows from ``tokens``, every start position once per epoch in an
    order drawn from ``seed`` and the epoch number (a permutation of ``len(tokens) - seq_len + 1``
    starts, as large as the token tensor). The position ``(epoch, cursor)`` is the whole state, so
    a resumed run continues with exactly the windows the uninterrupted run would take."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        if tokens.dim() != 1 or len(tokens) < seq_len:
            raise ValueError(f"TokenWindows: tokens must be 1-D with at least seq_len={seq_len} tokens, "
                             f"got shape {tuple(tokens.shape)}")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.n_windows = len(tokens) - seq_len + 1
        self.epoch, self.cursor = 0, 0
        self._order = self._order_of(0)
        # What the position refers to: resuming on other data or windows would be meaningless.
        self.fingerprint = {"seq_len": seq_len, "seed": seed, "n_tokens": len(tokens),
                            "sha256": hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest()}

    def _order_of(self, epoch: int) -> torch.Tensor:
        # torch's CPU generator keeps only 32 bits of a seed, so (seed, epoch) is hashed into 32 bits
        # rather than packed side by side (which would make every seed give the same orders).
        digest = hashlib.sha256(f"{self.seed}/{epoch}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))
        return torch.randperm(self.n_windows, generator=generator)

    def next_batch(self) -> torch.Tensor:
        """The next ``[batch_size, seq_len]`` window batch (crossing into the next epoch if needed)."""
        starts = []
        for _ in range(self.batch_size):
            if self.cursor == self.n_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._order_of(self.epoch)
            starts.append(int(self._order[self.cursor]))
            self.cursor += 1
        return torch.stack([self.tokens[s:s + self.seq_len] for s in starts])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: Mapping) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(f"resume: the checkpoint was trained on other data or windows ({state['fingerprint']}) "
                             f"than these ({self.fingerprint}); use the same text, seq_len and seed")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._order_of(self.epoch)


# ---------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The learning rate of optimizer step ``step + 1`` over the peak: linear warmup over ``warmup``
    steps, then a cosine from 1 down to ``min_ratio`` at ``total``, flat after."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    # Decay the matrices (projections, embeddings), not the gains and biases.
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95))


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether training in ``precision`` on ``device`` runs under bf16 autocast."""
    return precision == "bf16" or (precision == "auto" and hal_device.supports_bf16(device))


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))


@dataclasses.dataclass
class EvalResult:
    loss: float
    perplexity: float


def evaluate(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int, max_batches: int,
             precision: str = "fp32") -> EvalResult:
    """Language-model loss (without aux losses) and perplexity on consecutive held-out windows."""
    device = next(model.parameters()).device
    n = min(len(tokens) // seq_len, max_batches * batch_size)
    if n == 0:
        raise ValueError(f"evaluate: {len(tokens)} held-out tokens hold no window of seq_len={seq_len}")
    windows = tokens[:n * seq_len].view(n, seq_len).to(device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad(), _autocast(device, precision):  # evaluation only; the training step keeps grads
        for batch in windows.split(batch_size):
            total += model(batch, labels=batch).lm_loss.double() * len(batch)  # same-sized windows: mean of means
    model.train(was_training)
    loss = float(total) / n
    return EvalResult(loss, math.exp(min(loss, 700.0)))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class Progress:
    """The status line: redrawn in place on a terminal, one line per update otherwise."""

    def __init__(self, total: int, stream: TextIO):
        self.total, self.stream = total, stream
        self.live = stream.isatty()
        self._pending = False

    def update(self, step: int, fields: str) -> None:
        width = 20
        filled = width * step // self.total
        line = f"step {step:>{len(str(self.total))}}/{self.total} [{'#' * filled}{'.' * (width - filled)}] {fields}"
        if self.live:
            self.stream.write("\r" + line + "\033[K")
            self._pending = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        if self._pending:
            self.stream.write("\n")
            self._pending = False
        self.stream.write(text + "\n")
        self.stream.flush()


class _StepTimer:
    """Wall time of the training steps alone: evaluation and saving are paused out."""

    def __init__(self):
        self._banked, self._since = 0.0, time.perf_counter()

    def pause(self) -> None:
        self._banked += time.perf_counter() - self._since

    def resume(self) -> None:
        self._since = time.perf_counter()

    def elapsed(self) -> float:
        return self._banked + time.perf_counter() - self._since


@dataclasses.dataclass
class TrainResult:
    step: int  # the step reached
    losses: list[float]  # training loss of each step this call ran
    evals: list[tuple[int, EvalResult]]
    checkpoint: Optional[pathlib.Path]  # the last checkpoint saved or resumed from
    tokens_per_second: float


def train(model: torch.nn.Module, train_tokens: torch.Tensor, eval_tokens: torch.Tensor, cfg: TrainConfig,
          out_dir, *, resume_from=None, extra_files: Optional[Mapping[str, ckpt.FileContent]] = None,
          stream: Optional[TextIO] = None) -> TrainResult:
    """Train ``model`` (on its device) for ``cfg.steps`` steps in all, saving checkpoints in ``out_dir``.

    ``resume_from``: a checkpoint folder to continue from (weights, optimizer, scheduler, random
    generators, data position); without it, ``out_dir`` must hold no checkpoint. ``extra_files``
    (name -> content) go into every checkpoint as they are (model config, tokenizer files).
    ``model(ids, labels=ids)`` must return an output with ``.loss`` (to train on), ``.lm_loss`` (to
    evaluate) and ``.aux_loss`` (logged, as ``.z_loss`` if it has one). Progress goes to ``stream``
    (default: stdout).
    """
    out_dir = pathlib.Path(out_dir)
    device = next(model.parameters()).device
    data = TokenWindows(train_tokens, cfg.seq_len, cfg.batch_size, cfg.seed)
    optimizer = _optimizer(model, cfg)
    total = cfg.schedule_steps or cfg.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, cfg.warmup, total, cfg.min_lr_ratio))
    progress = Progress(cfg.steps, stream or sys.stdout)

    step, last_checkpoint = 0, None
    if resume_from is None and (found := ckpt.latest_checkpoint(out_dir)) is not None:
        raise ValueError(f"{out_dir} already holds checkpoints (latest: {found.name}); resume from it, "
                         "or train into another folder")
    if resume_from is not None:
        last_checkpoint = pathlib.Path(resume_from)
        ckpt.load_model_weights(model, last_checkpoint)
        state = ckpt.load_training_state(last_checkpoint)
        absent = [key for key in ("optimizer", "scheduler", "data", "rng", "step") if key not in state]
        if absent:
            raise ckpt.CheckpointError(f"{last_checkpoint / ckpt.STATE_FILE}: the training state has no "
                                       f"{', '.join(absent)}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        data.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"], device)
        step = state["step"]
        progress.line(f"resumed from {last_checkpoint} at step {step}")

    def save() -> pathlib.Path:
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "data": data.state_dict(), "rng": ckpt.rng_state(device), "train_config": dataclasses.asdict(cfg)}
        files = {ckpt.MODEL_FILE: ckpt.model_weights_writer(model),
                 ckpt.STATE_FILE: lambda path: torch.save(state, path), **(extra_files or {})}
        return ckpt.save_checkpoint(out_dir, step, files, keep_last=cfg.keep_last)

    model.train()
    losses: list[torch.Tensor] = []
    evals: list[tuple[int, EvalResult]] = []
    tokens_per_step = cfg.batch_size * cfg.seq_len
    timer = _StepTimer()
    first_step, logged_step, logged_seconds = step, step, 0.0
    while step < cfg.steps:
        batch = data.next_batch().to(device)
        with _autocast(device, cfg.precision):
            out = model(batch, labels=batch)
        loss = out.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(loss.detach())

        evaluating = step % cfg.eval_every == 0 or step == cfg.steps
        saving = step % cfg.save_every == 0 or step == cfg.steps
        if step % cfg.log_every == 0 or evaluating or saving:
            hal_device.synchronize(device)  # the GPU runs ahead: only log points wait for it
            loss_value = float(losses[-1])
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"the training loss is {loss_value} at step {step}; the last checkpoint is "
                                         f"{last_checkpoint}: resume from it with a lower lr or a longer warmup")
            seconds = timer.elapsed()
            rate = (step - logged_step) * tokens_per_step / max(seconds - logged_seconds, 1e-9)
            logged_step, logged_seconds = step, seconds
            aux = "".join(f"  {name} {float(value.detach()):.4f}" for name, value in
                          (("aux", out.aux_loss), ("z", getattr(out, "z_loss", None))) if value is not None)
            progress.update(step, f"loss {loss_value:.4f}{aux}  lr {scheduler.get_last_lr()[0]:.2e}  {rate:,.0f} tok/s")
        if evaluating or saving:
            timer.pause()  # evaluation and saving are not training time
            if evaluating:
                result = evaluate(model, eval_tokens, cfg.seq_len, cfg.batch_size, cfg.eval_batches, cfg.precision)
                evals.append((step, result))
                progress.line(f"eval  step {step}: loss {result.loss:.4f}  perplexity {result.perplexity:.2f}")
            if saving:
                last_checkpoint = save()
                progress.line(f"saved {last_checkpoint}")
            timer.resume()

    hal_device.synchronize(device)
    seconds = timer.elapsed()
    tokens_per_second = (step - first_step) * tokens_per_step / seconds if step > first_step else 0.0
    return TrainResult(step, torch.stack(losses).tolist() if losses else [], evals, last_checkpoint,
                       tokens_per_second)


# ---------------------------------------------------------------------------------------------
# apt-hal train
# ---------------------------------------------------------------------------------------------

HELP = "train an APT model on a text file, with atomic checkpoints and exact resume"
EPILOG = """examples:
  apt-hal train --data examples/tiny.txt --model apt-dense-tiny --out runs/tiny --steps 300
  apt-hal train --data examples/tiny.txt --out runs/tiny --steps 600 --resume     continue to step 600
  apt-hal train --data examples/tiny.txt --model my_config.json --out runs/mine   a ModelConfig JSON file
  apt-hal train --data examples/tiny.txt --model apt-moe-tiny --out runs/moe      mixture of experts
  apt-hal train --data examples/tiny.txt --model apt-dense-tiny --out runs/fp4 --mxfp4 ffn   MXFP4 FFN weights

A checkpoint is DIR/step-NNNNNNNN/ (weights, optimizer, scheduler, random generators, data position,
model config, tokenizer) and counts only once its manifest.json (SHA-256 of every file) is written;
the default precision is bf16 autocast where the device supports it. Then:
  apt-hal generate --checkpoint runs/tiny --prompt "The river"

""" + EXIT_CODES_EPILOG


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    p.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text; blank lines separate paragraphs")
    p.add_argument("--model", metavar="PRESET_OR_JSON",
                   help="a preset (apt-dense-tiny, apt-moe-tiny, ...) or a ModelConfig JSON file; vocab_size is set "
                        "to the tokenizer's (not needed with --resume)")
    p.add_argument("--out", required=True, metavar="DIR", help="the run folder the checkpoints go to")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out, with its model config and tokenizer "
                        "(starts fresh if there is none)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d["steps"], help="train until this step (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="windows per step (default %(default)s)")
    g.add_argument("--seq-len", type=int, default=d["seq_len"], help="tokens per window (default %(default)s)")
    g.add_argument("--lr", type=float, default=d["lr"], help="peak AdamW learning rate (default %(default)s)")
    g.add_argument("--min-lr-ratio", type=float, default=d["min_lr_ratio"],
                   help="the cosine ends at lr times this (default %(default)s)")
    g.add_argument("--warmup", type=int, default=d["warmup"], help="linear warmup steps (default %(default)s)")
    g.add_argument("--schedule-steps", type=int, default=d["schedule_steps"],
                   help="length of the cosine schedule (default: --steps); set it when a run will be continued")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="on matrices (default %(default)s)")
    g.add_argument("--grad-clip", type=float, default=d["grad_clip"],
                   help="clip the gradient norm to this (default %(default)s)")
    g = p.add_argument_group("evaluation, logging and checkpoints")
    g.add_argument("--eval-every", type=int, default=d["eval_every"],
                   help="steps between evaluations (default %(default)s)")
    g.add_argument("--eval-batches", type=int, default=d["eval_batches"], help="held-out batches (default %(default)s)")
    g.add_argument("--eval-fraction", type=float, default=d["eval_fraction"],
                   help="share of the text held out (default %(default)s)")
    g.add_argument("--save-every", type=int, default=d["save_every"],
                   help="steps between checkpoints (default %(default)s)")
    g.add_argument("--keep-last", type=int, default=d["keep_last"], help="checkpoints kept (default %(default)s)")
    g.add_argument("--log-every", type=int, default=d["log_every"],
                   help="steps between progress updates (default %(default)s)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", metavar="FILE", help="a tokenizer.json to use instead of training one on --data")
    g.add_argument("--vocab-size", type=int, default=512,
                   help=f"size of the byte-level BPE trained on --data (>= {MIN_VOCAB_SIZE}; default %(default)s)")
    g = p.add_argument_group("device and numerics")
    g.add_argument("--device", help="torch device, e.g. cpu or cuda:1 (default: apt_hal.get_device())")
    g.add_argument("--backend",
                   help="apt_hal backend policy, e.g. cpu or cuda-triton (default: APT_HAL_BACKEND or auto)")
    g.add_argument("--precision", choices=PRECISIONS, default=d["precision"],
                   help="auto: bf16 autocast where the device supports it (default %(default)s)")
    g.add_argument("--mxfp4", nargs="*", metavar="PATTERN",
                   help="store Linear layers as MXFP4 (frozen; the rest trains): every one but lm_head, or only "
                        "those inside modules matching the glob PATTERNs")
    g.add_argument("--seed", type=int, default=d["seed"], help="weights and data order (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    try:
        return _train_command(args)
    except (ValueError, OSError, ArithmeticError) as e:
        print(f"apt-hal train: error: {e}", file=sys.stderr)
        return 2


def _train_command(args: argparse.Namespace) -> int:
    import apt_hal
    from apt_hal.models import ModelConfig, parameter_count

    if args.backend:
        apt_hal.use(args.backend)
    device = parse_device(args.device) if args.device else hal_device.get_device()
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    text = pathlib.Path(args.data).read_text(encoding="utf-8")
    out = pathlib.Path(args.out)

    previous = ckpt.latest_checkpoint(out) if args.resume else None
    if previous is not None:
        ignored = [flag for flag in ("model", "tokenizer", "mxfp4") if getattr(args, flag) is not None]
        if ignored:
            print(f"resuming: the model, tokenizer and MXFP4 layout are the checkpoint's; ignoring "
                  f"{', '.join('--' + flag for flag in ignored)}")
        model_config = ModelConfig.from_json(previous / ckpt.MODEL_CONFIG_FILE)
        tokenizer = Tokenizer.load(previous)
        mxfp4 = json.loads((previous / ckpt.RUN_FILE).read_text(encoding="utf-8"))["mxfp4"]
    else:
        if args.resume:
            print(f"no checkpoint in {out}: starting from step 0")
        if not args.model:
            raise ValueError("--model is required to start a run (a preset such as apt-dense-tiny, or a JSON file)")
        tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else Tokenizer.train([text], args.vocab_size)
        is_file = args.model.endswith(".json") or pathlib.Path(args.model).is_file()
        model_config = ModelConfig.from_json(args.model) if is_file else ModelConfig.preset(args.model)
        model_config = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)
        mxfp4 = args.mxfp4
    if model_config.family == "seq2seq":
        raise ValueError("apt-hal train trains causal language models (dense, moe, oss); a seq2seq model needs "
                         "source/target pairs, not a text file")
    if cfg.seq_len > model_config.max_position:
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than the model's max_position={model_config.max_position}")

    hal_device.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = ckpt.make_model(model_config, mxfp4).to(device)
    tokens = encode_text(tokenizer, text)
    train_tokens, eval_tokens = split_tokens(tokens, cfg.eval_fraction, cfg.seq_len)
    precision = "bf16 autocast" if uses_bf16(device, cfg.precision) else "fp32"
    print(f"model {model_config.family}: {parameter_count(model) / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size}; "
          f"{len(train_tokens):,} training + {len(eval_tokens):,} held-out tokens; {device}, {precision}")
    extra_files = {ckpt.MODEL_CONFIG_FILE: model_config.to_json, **tokenizer.to_files(),
                   ckpt.RUN_FILE: json.dumps({"mxfp4": mxfp4}).encode("utf-8")}
    result = train(model, train_tokens, eval_tokens, cfg, out, resume_from=previous, extra_files=extra_files)
    print(f"done: step {result.step}, {result.tokens_per_second:,.0f} training tokens/s; "
          f"latest checkpoint {result.checkpoint}")
    return 0
