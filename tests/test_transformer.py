"""The decoder-only transformer: its parameter count against the formula, causality, the
language-model interface of the task, its options, and one `lbs-tune train` on WikiText-2 files."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_jsonl, tiny_base, write_spec
from fixtures_formats import WIKITEXT2_TRAIN, write_wikitext2

from lbs_tune.models import build_model, detach_hidden, model_options, model_task

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 8, "dropout": 0.0}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight is one parameter


def formula(vocab: int, window: int, width: int, layers: int, tied: bool) -> int:
    """V C + T C + L (12 C^2 + 13 C) + 2 C (+ V C untied). Per block: two LayerNorms 2 x 2C,
    attention in 3C x C + 3C and out C x C + C, MLP C x 4C + 4C and 4C x C + C; then the final
    LayerNorm 2C; the head has no bias and is the token embedding when tied."""
    block = 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width)
    block += (4 * width * width + 4 * width) + (4 * width * width + width)
    assert block == 12 * width**2 + 13 * width
    head = 0 if tied else vocab * width
    return vocab * width + window * width + layers * block + 2 * width + head


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(
    ("vocab", "window", "layers", "heads", "width"),
    [(13, 5, 2, 2, 8), (50, 16, 3, 4, 32), (33_278, 128, 6, 6, 384)],
)
def test_parameter_count_matches_the_formula(vocab, window, layers, heads, width, tied):
    options = {"n_layer": layers, "n_head": heads, "n_embd": width, "tied": tied}
    with torch.device("meta"):
        model = build_model("transformer", vocab, (window,), **options)
    assert count(model) == formula(vocab, window, width, layers, tied)


def test_default_size_on_wikitext2():
    # WikiText-2's 33,278 words, windows of 128, nanoGPT's 6 x 384 defaults, tied:
    # 33,278 x 384 = 12,778,752 + 128 x 384 = 49,152 + 6 x (12 x 384^2 + 13 x 384) = 10,646,784
    # + 2 x 384 = 768: 23,475,456.
    with torch.device("meta"):
        model = build_model("transformer", 33_278, (128,))
    assert count(model) == 23_475_456


def test_later_tokens_do_not_change_earlier_outputs():
    torch.manual_seed(0)
    model = build_model("transformer", 20, (8,), **TINY).eval()
    tokens = torch.randint(0, 20, (3, 8))
    changed = tokens.clone()
    changed[:, 5:] = (tokens[:, 5:] + 7) % 20
    with torch.no_grad():
        before, _ = model(tokens)
        after, _ = model(changed)
    assert before.shape == (3, 8, 20)
    torch.testing.assert_close(after[:, :5], before[:, :5], rtol=0, atol=1e-6)
    # The outputs from position 5 on do change: the check above can fail.
    assert not torch.allclose(after[:, 5:], before[:, 5:], atol=1e-3)
    # And an earlier token reaches every later position.
    first = tokens.clone()
    first[:, 0] = (tokens[:, 0] + 1) % 20
    with torch.no_grad():
        moved, _ = model(first)
    assert all(not torch.allclose(moved[:, t], before[:, t], atol=1e-4) for t in range(8))


def test_the_task_interface_carries_an_empty_state():
    model = build_model("transformer", 20, (6,), **TINY)
    assert model_task("transformer") == "language_model"
    tokens = torch.randint(0, 20, (2, 6))
    logits, hidden = model(tokens, None)
    assert hidden == () and detach_hidden(hidden) == ()
    again, _ = model(tokens, detach_hidden(hidden))
    assert logits.shape == again.shape == (2, 6, 20)
    # Evaluation's last window may be shorter than bptt.
    assert model(tokens[:, :3], hidden)[0].shape == (2, 3, 20)
    with pytest.raises(ValueError, match="window of 7 tokens is longer than 6"):
        model(torch.zeros(1, 7, dtype=torch.long))


def test_tied_head_and_initialisation():
    torch.manual_seed(0)
    model = build_model("transformer", 500, (16,), n_layer=4, n_head=4, n_embd=128)
    assert model.lm_head.weight is model.wte.weight
    untied = build_model("transformer", 500, (16,), n_layer=4, n_head=4, n_embd=128, tied=False)
    assert untied.lm_head.weight is not untied.wte.weight
    # nanoGPT's init: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 x 4 layers)).
    assert model.blocks[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = torch.cat([b.mlp.c_proj.weight.flatten() for b in model.blocks])
    assert residual.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert all(b.attn.c_attn.bias.abs().max() == 0 for b in model.blocks)


def test_options_and_bad_values():
    assert model_options("transformer") == {
        "n_layer": 6, "n_head": 6, "n_embd": 384, "dropout": 0.2, "tied": True,
    }  # fmt: skip
    for options, message in [
        ({"n_embd": 10, "n_head": 4}, "n_embd 10 must be a multiple of n_head 4"),
        ({"n_layer": 0}, "must be positive"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_model("transformer", 20, (6,), **options)
    with pytest.raises(ValueError, match=r"input shape \(bptt,\)"):
        build_model("transformer", 20, (3, 32, 32))


def test_trains_on_wikitext2_files(cli, tmp_path):
    write_wikitext2(tmp_path / "data", train=WIKITEXT2_TRAIN * 8)
    base = tiny_base(
        dataset="wikitext2", model="transformer", model_options={**TINY, "dropout": 0.1},
        batch_size=2, steps=6, eval_every=100, eval_batch_size=2,
        data={"dir": str(tmp_path / "data"), "bptt": 5},
        optimizer={"name": "adamw", "weight_decay": 0.1}, lr={"base": 1e-3, "base_batch_size": 2},
    )  # fmt: skip
    code, _, err = cli("train", write_spec(tmp_path / "t.yaml", base), "--out", tmp_path / "run")
    assert code == 0, err
    (row,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    # 184 training tokens as 2 rows of 92: 6 steps of 2 windows of 5 tokens.
    assert row["step"] == 6 and row["examples"] == 60
    assert math.isfinite(row["val/perplexity"]) and math.isfinite(row["train/loss"])
    assert row["val/perplexity"] == pytest.approx(math.exp(row["val/loss"]))
    # Six steps at LR 1e-3 from N(0, 0.02) weights: still about uniform over the 13 words.
    assert row["val/perplexity"] == pytest.approx(13, rel=0.2)


def test_the_sde_rule_trains_with_the_moved_adam_hyper_parameters(cli, tmp_path):
    # Batch 8 at base batch 2: k = 4, so lr x 2, 1 - beta x 4, eps / 2 (Malladi et al. 2022).
    base = tiny_base(
        dataset="synthetic", model="transformer", model_options=TINY,
        data={"samples": 400, "classes": 13, "bptt": 5}, batch_size=8, steps=2, eval_every=100,
        optimizer={"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8},
        lr={"base": 1e-3, "base_batch_size": 2, "scaling": "sde"},
    )  # fmt: skip
    code, _, err = cli("train", write_spec(tmp_path / "t.yaml", base), "--out", tmp_path / "run")
    assert code == 0, err
    (row,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert row["peak_lr"] == pytest.approx(2e-3)
    assert row["optimizer/beta1"] == pytest.approx(0.6)
    assert row["optimizer/beta2"] == pytest.approx(0.996)
    assert row["optimizer/eps"] == pytest.approx(5e-9)
    # At batch 32 (k = 16) 1 - beta1 would be 1.6: refused before anything runs.
    spec = write_spec(tmp_path / "far.yaml", {**base, "batch_size": 32})
    code, _, err = cli("train", spec, "--out", tmp_path / "far")
    assert code == 2 and "lr.scaling" in err and err.count("\n") == 1
    assert not (tmp_path / "far").exists()
