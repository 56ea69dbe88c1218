"""Training the organism's connector: the LLaVA projector plus LoRA on the LLM's attention.

The tower's pre-projector features are cached once per video (:mod:`.features`); each step runs the
projector and the LLM on a batch of videos, each followed by all of its questions ("Question: ...
\\nAnswer: <word>" lines), and takes the cross-entropy of each answer over its task's option words at
the position before the answer (the LM head only there; the option set is what evaluation scores).
LoRA (Hu et al., 2021, ``B = 0`` at the start, so training starts from the pretrained LLM) is
``peft``'s, injected into every linear layer of the LLM (attention and MLP); the saved A/B matrices are
merged into the weights when loading, so using the model does not need ``peft``. Seeds are fixed: the
same command gives the same weights on the same machine with the same torch thread count (the thread
count changes float rounding, and training amplifies it: two threads took a different path).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import COLOURS, FRAMES, OPTIONS, PHOTOS, TASKS, Item, photo, train_items
from .features import cache_features
from .model import CACHE, LORA_TARGETS, WEIGHTS, base, sha256


@dataclass
class TrainSettings:
    videos: int = 1000
    steps: tuple[int, ...] = (700, 500, 500, 500)  # cosine cycles; each after the first is a warm restart (see train)
    batch: int = 2
    lr_projector: float = 3e-4
    lr_lora: float = 5e-4
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    warmup: int = 30
    align_videos: int = 300
    align_position: float = 1.0  # weight of the photo x-coordinate in the alignment targets (see align_projector)
    seed: int = 0
    threads: int = 1
    init: str | None = None  # continue from this weights file (projector + LoRA) instead of the closed-form start


class StandardisedLinear(nn.Module):
    """``linear(x * scale)``: the projector's first layer trained on per-channel standardised inputs. DINOv2's
    layer-6 features are ~25x smaller than its layer-12 ones (rms 0.1 vs 2.3), so without this the layer-6
    columns (the colour) learn that much slower under Adam. :meth:`fold` writes ``weight * scale`` back
    into the plain ``nn.Linear``: the saved model computes the same function."""

    def __init__(self, linear: nn.Linear, scale: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.scale)

    def fold(self) -> nn.Linear:
        with torch.no_grad():
            self.linear.weight.mul_(self.scale)
        return self.linear


def token_targets(item: Item, cells: int = 4, cell_px: int = 28, min_overlap: float = 0.25
                  ) -> tuple[torch.Tensor, list[str]]:
    """Per pooled token of ``item``'s video (frames x cells x cells, row-major): the index into the returned
    word list of what it shows (the square's colour where the square covers >= ``min_overlap`` of the
    token's 28 px cell, else the photograph), -1 where the square covers only part of less than that."""
    words = list(PHOTOS) + list(COLOURS)
    video = item.video
    out = torch.empty(FRAMES, cells, cells, dtype=torch.long)
    boxes = dict(zip(video.flashes, video.boxes, strict=True))
    for f in range(FRAMES):
        shown = video.photos[0] if video.cut is None or f < video.cut else video.photos[1]
        out[f] = words.index(shown)
        if f in boxes:
            x, y, side = boxes[f]
            for r in range(cells):
                for c in range(cells):
                    ox = max(0, min(x + side, (c + 1) * cell_px) - max(x, c * cell_px))
                    oy = max(0, min(y + side, (r + 1) * cell_px) - max(y, r * cell_px))
                    frac = ox * oy / cell_px ** 2
                    if frac >= min_overlap:
                        out[f, r, c] = words.index(video.colour)
                    elif frac > 0:
                        out[f, r, c] = -1
    return out.flatten(1), words


def token_columns(item: Item, cells: int = 4) -> torch.Tensor:
    """Per pooled token of ``item``'s video (frames x cells x cells, row-major): the horizontal place in its
    photograph of the centre of what the token shows, 0 (the photo's left edge) to 1 (its right edge)."""
    video = item.video
    out = torch.empty(FRAMES, cells, cells)
    offsets = (torch.arange(cells) + 0.5) / cells * 2 - 1  # cell centres in [-1, 1] of the crop
    for f in range(FRAMES):
        p = 0 if video.cut is None or f < video.cut else 1
        img = photo(video.photos[p])
        width_units = img.shape[2] / min(img.shape[1:])  # the photo's width in shorter-side units
        cx, _, half = video.paths[p][f]
        out[f] = ((cx + half * offsets) / width_units).expand(cells, cells)
    return out.flatten(1)


@torch.no_grad()
def align_projector(proj: nn.Module, items: list[Item], feats: torch.Tensor, embeddings: torch.Tensor,
                    word_ids: dict[str, int], ridge: float = 1.0, position: float = 0.0) -> float:
    """LLaVA's first stage (feature alignment) in closed form: keep the projector's first layer, and set its
    second by ridge regression so that each visual token lands on the input embedding of the word for
    what it shows (its photograph's name, or the square's colour). The LLM then starts from word-like
    visual tokens instead of noise; training goes on from there. With ``position`` > 0 a photograph
    token's target also moves along ``embedding(" right") - embedding(" left")`` by ``position * (u - 0.5)``,
    ``u`` its horizontal place in the photograph (:func:`token_columns`): a grounding target (where in the
    photograph the content is), from which a camera pan reads as the order of left and right content.
    Returns the fit's R^2."""
    hidden, target = [], []
    lateral = embeddings[word_ids["right"]] - embeddings[word_ids["left"]]
    photo_words = len(PHOTOS)
    for item, f in zip(items, feats, strict=True):
        labels, words = token_targets(item)
        keep = labels.flatten() >= 0
        h = nn.functional.gelu(proj.linear_1(f.float().flatten(0, 1)))
        hidden.append(h[keep])
        y = embeddings[[word_ids[words[i]] for i in labels.flatten()[keep].tolist()]]
        if position:
            on_photo = (labels.flatten()[keep] < photo_words).float()[:, None]
            u = token_columns(item).flatten()[keep][:, None]
            y = y + position * (u - 0.5) * on_photo * lateral
        target.append(y)
    h, y = torch.cat(hidden), torch.cat(target)
    h1 = torch.cat([h, torch.ones(len(h), 1)], 1).double()
    gram = h1.t() @ h1 + ridge * torch.eye(h1.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, h1.t() @ y.double()).float()
    proj.linear_2.weight.copy_(w[:-1].t())
    proj.linear_2.bias.copy_(w[-1])
    fit = h1.float() @ w
    return float(1 - (fit - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@torch.no_grad()
def continue_from(weights: Path, proj: nn.Module, lora: dict[str, tuple[nn.Parameter, nn.Parameter]]) -> None:
    """Start from a weights file :func:`train` wrote (its projector, with the first layer's folded
    standardisation undone, and its LoRA A/B) instead of the closed-form alignment: more steps on a
    committed model without redoing the first ones."""
    from safetensors.torch import load_file

    state = load_file(str(weights))
    first: StandardisedLinear = proj.linear_1
    first.linear.weight.copy_(state["projector.linear_1.weight"] / first.scale)
    first.linear.bias.copy_(state["projector.linear_1.bias"])
    proj.linear_2.weight.copy_(state["projector.linear_2.weight"])
    proj.linear_2.bias.copy_(state["projector.linear_2.bias"])
    missing = [name for name in lora if f"lora.{name}.lora_A" not in state]
    if missing:
        raise ValueError(f"{weights} has no LoRA for {missing[:3]}...: train it with the same lora_targets")
    for name, (a, b) in lora.items():
        a.copy_(state[f"lora.{name}.lora_A"])
        b.copy_(state[f"lora.{name}.lora_B"])


def add_lora(language_model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...]
             ) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Inject ``peft`` LoRA adapters into ``targets`` of every layer; returns {module name: (A, B)} with A
    ``[rank, in]`` and B ``[out, rank]`` (the layout :func:`.model.lora_deltas` merges)."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets)),
                            language_model)
    return {name: (module.lora_A["default"].weight, module.lora_B["default"].weight)
            for name, module in language_model.named_modules() if hasattr(module, "lora_A")}


def seqs_word(tokenizer: Any, word: str) -> int:
    """The single token of ``" " + word``; ValueError if the tokenizer splits it."""
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"answer word {word!r} is not one token for this tokenizer: {ids}")
    return ids[0]


class Sequences:
    """Token ids of "<video> x N" + questions and answers, and where each answer is predicted."""

    def __init__(self, tokenizer: Any, video_id: int, visual_tokens: int) -> None:
        self.tok, self.video_id, self.visual = tokenizer, video_id, visual_tokens
        self.option_ids = {task: [self._word(w) for w in words] for task, words in OPTIONS.items()}

    def _word(self, word: str) -> int:
        return seqs_word(self.tok, word)

    def build(self, item: Item, order: list[int]) -> tuple[list[int], list[tuple[int, str, int]]]:
        """ids, and per question (position predicting the answer, task, answer's option index). The first
        question's tokens equal the processor's prompt for that question alone (tested)."""
        ids = [self.video_id] * self.visual
        targets = []
        for k in order:
            q = item.questions[k]
            ids += self.tok.encode(f"\nQuestion: {q.text}\nAnswer:", add_special_tokens=False)
            targets.append((len(ids) - 1, q.task, q.options.index(q.answer)))
            ids.append(self.option_ids[q.task][q.options.index(q.answer)])
        return ids, targets


def embed(model: nn.Module, ids: torch.Tensor, feats: torch.Tensor, video_id: int) -> torch.Tensor:
    """Input embeddings with the projected cached features in the video tokens' rows, as
    ``LlavaNextVideoModel.forward`` places ``get_video_features``' output."""
    inner = model.model
    emb = inner.language_model.embed_tokens(ids)
    vis = inner.multi_modal_projector(feats.float()).flatten(1, 2)  # [B, frames * tokens, hidden]
    mask = (ids == video_id).unsqueeze(-1).expand_as(emb)
    return emb.masked_scatter(mask, vis.to(emb.dtype))


def option_logits(model: nn.Module, hidden: torch.Tensor, option_ids: list[int]) -> torch.Tensor:
    return hidden @ model.lm_head.weight[option_ids].t()


def batch_loss(model: nn.Module, seqs: Sequences, items: list[Item], feats: torch.Tensor,
               rng: np.random.Generator) -> tuple[torch.Tensor, list[tuple[str, bool]]]:
    """Mean cross-entropy over the batch's answers (each over its task's options), and per answer its
    task and whether the highest option logit was right."""
    built = [seqs.build(item, list(rng.permutation(len(item.questions)))) for item in items]
    length = max(len(ids) for ids, _ in built)
    ids = torch.full((len(built), length), seqs.tok.pad_token_id or 0)
    mask = torch.zeros((len(built), length), dtype=torch.long)
    for b, (row, _) in enumerate(built):
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = 1
    emb = embed(model, ids, feats, seqs.video_id)
    hidden = model.model.language_model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    losses, hits = [], []
    for b, (_, targets) in enumerate(built):
        for pos, task, answer in targets:
            logits = option_logits(model, hidden[b, pos], seqs.option_ids[task])
            losses.append(nn.functional.cross_entropy(logits[None], torch.tensor([answer])))
            hits.append((task, int(logits.argmax()) == answer))
    return torch.stack(losses).mean(), hits


def running_accuracy(hits: list[list[tuple[str, bool]]], window: int = 100) -> dict[str, float]:
    """Per task, the accuracy over the answers of the last ``window`` steps (answers the optimiser had not
    yet stepped on when they were scored: a held-out estimate during the first epoch)."""
    out = {}
    for task in TASKS:
        seen = [hit for step in hits[-window:] for t, hit in step if t == task]
        if seen:
            out[task] = sum(seen) / len(seen)
    return out


def train(settings: TrainSettings, out: Path = WEIGHTS, progress: bool = True) -> dict[str, Any]:
    """Train from scratch (or from ``settings.init``) and write ``out`` (safetensors), ``out``.json (settings,
    loss curve, every training answer, sha256, time) and ``out``.png (loss and per-task accuracy curves).

    ``settings.steps`` lists the schedule's cycles. Every cycle after the first is a warm restart (SGDR,
    Loshchilov & Hutter, 2017): it starts from the previous cycle's saved weights exactly as
    ``--init`` would in a new process (fresh seeds, optimiser and warm-up, cosine over its own steps), so
    ``steps=(700, 500)`` gives the same weights as a 700-step run continued with ``--init`` for 500 steps.
    Returns the json's content."""
    import tempfile

    from safetensors.torch import save_file

    curve: list[float] = []
    hits: list[list[tuple[str, bool]]] = []
    seconds: list[float] = []
    init, r2 = settings.init, None
    with tempfile.TemporaryDirectory() as tmp:
        for cycle, steps in enumerate(settings.steps):
            desc = "train" if len(settings.steps) == 1 else f"train {cycle + 1}/{len(settings.steps)}"
            state, cycle_curve, cycle_hits, took, cycle_r2 = _cycle(settings, steps, init, desc, progress)
            curve += cycle_curve
            hits += cycle_hits
            seconds.append(round(took, 1))
            r2 = cycle_r2 if cycle == 0 else r2
            if cycle < len(settings.steps) - 1:
                init = str(Path(tmp) / f"cycle-{cycle + 1}.safetensors")
                save_file(state, init)
    meta = {"settings": json.dumps({**asdict(settings), "lora_scale": settings.lora_alpha / settings.lora_rank})}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata=meta)
    record = {"settings": asdict(settings), "train_seconds": round(sum(seconds), 1), "cycle_seconds": seconds,
              "sha256": sha256(out), "alignment_r2": None if r2 is None else round(r2, 4),
              "final_running_accuracy": running_accuracy(hits),
              "loss": [round(c, 4) for c in curve],
              "answers": [[[t, int(h)] for t, h in step] for step in hits]}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    _plot(curve, hits, out.with_suffix(".png"), restarts=list(itertools.accumulate(settings.steps))[:-1])
    return record


def _cycle(settings: TrainSettings, steps: int, init: str | None, desc: str, progress: bool
           ) -> tuple[dict[str, torch.Tensor], list[float], list[list[tuple[str, bool]]], float, float | None]:
    """One cosine cycle of ``steps`` steps in a freshly built model, from ``init`` (a weights file) or from the
    closed-form alignment: (the weights to save, loss per step, answers per step, seconds, alignment R²)."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model, proc = base()
    items = train_items(settings.videos)
    feats = cache_features(model, items, CACHE / "organism" / f"train-{settings.videos}.pt", progress)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = add_lora(model.model.language_model, settings.lora_rank, settings.lora_alpha, settings.lora_targets)
    proj = model.model.multi_modal_projector
    std = feats[:200].float().flatten(0, 2).std(0)
    proj.linear_1 = StandardisedLinear(proj.linear_1, 1 / (std + 1e-3))
    word_ids = {w: seqs_word(proc.tokenizer, w) for ws in OPTIONS.values() for w in ws}
    if init:
        r2 = None
        continue_from(Path(init), proj, lora)
    else:
        r2 = align_projector(proj, items[:settings.align_videos], feats[:settings.align_videos],
                             model.model.language_model.embed_tokens.weight, word_ids,
                             position=settings.align_position)
    projector = list(proj.parameters())
    for p in projector:
        p.requires_grad_(True)
    lora_params = [p for pair in lora.values() for p in pair]
    opt = torch.optim.AdamW([{"params": projector, "lr": settings.lr_projector},
                             {"params": lora_params, "lr": settings.lr_lora}], weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    seqs = Sequences(proc.tokenizer, model.config.video_token_id, feats.shape[1] * feats.shape[2])
    model.train()
    curve, hits, start = [], [], time.time()
    order = rng.permutation(len(items))
    cursor = 0
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        if cursor + settings.batch > len(order):
            order, cursor = rng.permutation(len(items)), 0
        idx = order[cursor:cursor + settings.batch]
        cursor += settings.batch
        warm = min(1.0, (step + 1) / settings.warmup)
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = lr * warm * decay
        loss, step_hits = batch_loss(model, seqs, [items[i] for i in idx], feats[torch.as_tensor(idx)], rng)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector + lora_params, 1.0)
        opt.step()
        curve.append(float(loss.detach()))
        hits.append(step_hits)
        bar.set_postfix(loss=f"{np.mean(curve[-20:]):.3f}",
                        **{t[:5]: f"{a:.2f}" for t, a in running_accuracy(hits).items()})
    seconds = time.time() - start
    proj.linear_1 = proj.linear_1.fold()
    state = {f"projector.{k}": v.detach().contiguous() for k, v in proj.state_dict().items()}
    for name, (a, b) in lora.items():
        state[f"lora.{name}.lora_A"] = a.detach().contiguous()
        state[f"lora.{name}.lora_B"] = b.detach().contiguous()
    return state, curve, hits, seconds, r2


def _plot(curve: list[float], hits: list[list[tuple[str, bool]]], path: Path, restarts: list[int]) -> None:
    """The loss (left) and each task's running accuracy over the last 100 steps (right); dotted lines at the
    schedule's warm restarts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = np.array(curve)
    k = max(1, len(loss) // 30)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, (ax, acc) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax.plot(loss, alpha=0.3, label="batch")
    ax.plot(np.arange(len(smooth)) + k - 1, smooth, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy over the options")
    ax.set_title("organism training loss")
    ax.legend()
    steps = range(20, len(hits) + 1, max(1, len(hits) // 100))
    running = {s: running_accuracy(hits[:s]) for s in steps}
    for task in TASKS:
        points = [(s, acc_s[task]) for s, acc_s in running.items() if task in acc_s]
        if points:
            acc.plot(*zip(*points, strict=True), label=task)
    acc.set_xlabel("step")
    acc.set_ylabel("accuracy, last 100 steps")
    acc.set_ylim(0, 1.02)
    acc.set_title("training answers per task (scored before the step)")
    for restart in restarts:
        for axis in (ax, acc):
            axis.axvline(restart, color="grey", linestyle=":", linewidth=1)
    if acc.get_legend_handles_labels()[0]:  # a run shorter than 20 steps has no running accuracy yet
        acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
