"""The documentation site: every page is in the nav, every code block it shows either runs here (the files it
includes from examples/) or parses, and the Keras page covers every construct of the articles with an example."""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_ext" not in p.parts)
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', flags=re.MULTILINE)
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", flags=re.MULTILINE | re.DOTALL)
# Files the pages include that other tests run: tests/test_examples_*.py.
RUN_ELSEWHERE = {
    "examples/existing_trainer.py": "test_examples_existing_trainer.py",
    "examples/mixup.py": "test_examples_mixing.py",
    "examples/label_smoothing.py": "test_examples_mixing.py",
    "examples/mc_dropout.py": "test_examples_mc_dropout.py",
}
RUN_HERE = {
    "examples/keras_layers.py",
    "examples/keras_recurrent.py",
    "examples/keras_losses.py",
    "examples/keras_early_stopping.py",
    "examples/train_eval.py",
}


def nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return [page for item in nav for page in nav_pages(item)]


def includes() -> list[tuple[Path, str, str | None]]:
    """(page, file, section) for every snippet the pages include."""
    found = []
    for page in PAGES:
        for target in SNIPPET.findall(page.read_text()):
            path, _, section = target.partition(":")
            found.append((page, path, section or None))
    return found


def load_example(path: str):
    spec = importlib.util.spec_from_file_location(f"docs_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = nav_pages(config["nav"])
    assert sorted(nav) == sorted(str(p.relative_to(DOCS)) for p in PAGES)


def test_every_included_file_and_section_exists_and_is_run_by_a_test():
    assert includes(), "the pages include no files"
    for page, path, section in includes():
        text = (ROOT / path).read_text()
        if section is not None:
            assert f"--8<-- [start:{section}]" in text, (page.name, path, section)
            assert f"--8<-- [end:{section}]" in text, (page.name, path, section)
        if path.startswith("examples/") and path.endswith(".py"):
            assert path in RUN_HERE or path in RUN_ELSEWHERE, f"{page.name} shows {path}, which no test runs"
    for path, test_file in RUN_ELSEWHERE.items():
        assert Path(path).stem in (ROOT / "tests" / test_file).read_text()


def test_code_written_in_the_pages_parses():
    blocks = [(page, lang, code) for page in PAGES for lang, code in FENCE.findall(page.read_text())]
    assert blocks
    for page, lang, code in blocks:
        if SNIPPET.search(code):
            continue  # an included file: run by the tests below or elsewhere
        if lang == "python":
            ast.parse(code, filename=str(page))
        elif lang == "yaml":
            yaml.safe_load(code)


KERAS_CONSTRUCTS = [
    "layers.Dropout(",
    "SpatialDropout2D",
    "LSTM(64, dropout=0.2, recurrent_dropout=0.2)",
    "BatchNormalization",
    "LayerNormalization",
    "InstanceNormalization",
    "label_smoothing",
    "mix_up",
    "cutmix",
    "EarlyStopping",
    "l2(c)",
    "Dense",
]


def test_keras_page_has_every_construct_with_an_included_example():
    text = (DOCS / "keras.md").read_text()
    table = text[text.index("## The table") : text.index("## The traps")]
    rows = [line for line in table.splitlines() if line.startswith("|")][2:]  # below the header and its rule
    for construct in KERAS_CONSTRUCTS:
        assert any(construct in row for row in rows), construct
    sections = {
        re.sub(r"[^a-z0-9_ -]", "", title.lower()).strip().replace(" ", "-"): body
        for title, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    }
    for row in rows:
        (anchor,) = re.findall(r"\]\(([^)]*)\)", row)
        if anchor.startswith("#"):
            assert SNIPPET.search(sections[anchor[1:]]), f"no example under {anchor}"
    for trap in ("1 - momentum", "1e-3", "1e-5", "2 * c", "decoupled", "same formula", "ModelCheckpoint"):
        assert trap in text, trap


@pytest.mark.parametrize("stem", ["keras_layers", "keras_recurrent", "keras_losses"])
def test_keras_examples_run(stem):
    checks = load_example(f"examples/{stem}.py").main()
    assert all(isinstance(v, float) for v in checks.values())
    if stem == "keras_layers":
        assert 0.4 < checks["dropout_kept_fraction"] < 0.6
        assert 0.0 < checks["spatial_dropout_dropped_channels"] < 0.7
    if stem == "keras_recurrent":
        assert checks["mc_mutual_information"] > 0


def test_keras_early_stopping_restores_the_best_weights(tmp_path):
    result = load_example("examples/keras_early_stopping.py").main(max_epochs=4, root=str(tmp_path), patience=1)
    assert result["restored_val_loss"] == pytest.approx(result["best_val_loss"], rel=1e-6)
    assert result["epochs_run"] <= 4


def test_train_eval_example_shows_what_eval_mode_changes():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = load_example("examples/train_eval.py").main(epochs=2)
    finally:
        torch.set_num_threads(threads)
    assert result["eval_repeat_max_diff"] == 0.0
    assert result["train_repeat_max_diff"] > 0.0  # dropout samples when eval() is forgotten
    assert result["running_mean_shift"] > 0.0  # and BatchNorm's statistics move
    assert result["single_image_in_train_mode_fails"] == 1.0
    assert result["eval_accuracy"] > 0.5


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="mkdocs is not installed (the `docs` extra)")
def test_site_builds_in_strict_mode(tmp_path):
    # CI runs the same command (.ci/run); here for a local `pytest -m slow`.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
