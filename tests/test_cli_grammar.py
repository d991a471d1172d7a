"""One grammar for every command: the same model argument, defaults in help, did-you-mean, exit codes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import demo_images

from imgclf.cli import STAGES, TOOLS, build_parser, main
from imgclf.config import load_config
from imgclf.errors import DataError
from imgclf.modelfile import ModelKind, identify
from imgclf.stages import export


@pytest.fixture(scope="module")
def model_files(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four ways to name one model: run directory, checkpoint, ONNX file, TorchScript file."""
    out = tmp_path_factory.mktemp("models")
    return {"run": tiny_run, "checkpoint": tiny_run / "checkpoints" / "best.ckpt",
            "onnx": export.run(export.ExportOptions(tiny_run, None, out / "m.onnx")).path,
            "torchscript": export.run(export.ExportOptions(tiny_run, None, out / "m.torchscript")).path}


def test_identify_tells_models_apart_and_names_other_files(model_files: dict[str, Path], tmp_path: Path) -> None:
    kinds = {name: identify(path) for name, path in model_files.items()}
    assert kinds == {"run": ModelKind.RUN, "checkpoint": ModelKind.CHECKPOINT, "onnx": ModelKind.ONNX,
                     "torchscript": ModelKind.TORCHSCRIPT}
    image = demo_images("test", "Bag", 1)[0]
    with pytest.raises(DataError, match="a PNG image"):
        identify(image)
    (tmp_path / "c.csv").write_text("url,label\n")
    with pytest.raises(DataError, match="a text file"):
        identify(tmp_path / "c.csv")
    with pytest.raises(DataError, match="not a run directory"):
        identify(tmp_path)


@pytest.mark.parametrize("kind", ["run", "checkpoint", "onnx", "torchscript"])
def test_every_command_takes_every_model_kind(kind: str, model_files: dict[str, Path], tiny_data_dir: Path,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(model_files[kind])
    images = [str(p) for p in demo_images("test", "Coat", 3)]
    # predict and evaluate: the same --model spelling, whatever the file.
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--model", model, *images, "-o", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert main(["evaluate", "--model", model, "--data", str(tiny_data_dir), "--out", str(tmp_path / "ev"),
                 "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n_images"] == 30 and 0.0 <= metrics["f1_macro"] <= 1.0
    # serve accepts it too (the app is built exactly as `imgclf serve` builds it).
    from fastapi.testclient import TestClient

    from imgclf.inference import load_classifier
    from imgclf.serve import create_app

    with TestClient(create_app(load_classifier(model))) as client:
        assert client.get("/health").json()["classes"] == 3
    # export: PyTorch weights export; an exported file is refused with one line saying what it is.
    code = main(["export", "--model", model, "-o", str(tmp_path / "again.onnx")])
    err = capsys.readouterr().err
    if kind in ("run", "checkpoint"):
        assert code == 0 and (tmp_path / "again.onnx").is_file()
    else:
        assert code == 2 and err.count("\n") == 1 and "already an exported" in err


def test_export_follows_the_output_suffix(model_files: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--model", str(model_files["run"]), "-o", str(tmp_path / "m.ts")]) == 0
    assert identify(tmp_path / "m.ts") == ModelKind.TORCHSCRIPT
    capsys.readouterr()
    assert main(["export", "--model", str(model_files["run"]), "-o", str(tmp_path / "m.tflite")]) == 2
    assert "cannot write .tflite" in capsys.readouterr().err
    assert not (tmp_path / "m.tflite").exists()
    assert main(["export", "--model", str(model_files["run"]), "--format", "onnx", "-o", str(tmp_path / "m.pt")]) == 2
    assert "disagrees" in capsys.readouterr().err


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_default_is_shown_in_help() -> None:
    missing = []
    for name, sub in _subparsers().items():
        text = sub.format_help().split("options:", 1)[1]  # after the usage lines, which name every flag too
        for action in sub._actions:
            default = action.default
            if (not action.option_strings or action.help == argparse.SUPPRESS or default is None
                    or default is False or default == argparse.SUPPRESS or isinstance(action, argparse._HelpAction)):
                continue
            flag = action.option_strings[-1]
            block = text.split(flag + " ", 1)[-1].split(flag + "\n", 1)[-1].split("\n  -", 1)[0]
            if "default" not in block:
                missing.append(f"{name} {flag}")
    assert not missing, f"options whose help hides the default: {missing}"


def test_the_same_option_means_the_same_thing() -> None:
    subs = _subparsers()
    for name in ("evaluate", "predict", "export", "serve"):
        assert "--model" in subs[name].format_help(), name
    for name in ("train", "evaluate", "audit"):  # --data is the data directory everywhere
        assert "--data" in subs[name].format_help(), name
    for name in ("download", "train", "evaluate", "demo"):  # --out is a folder everywhere
        assert "--out" in subs[name].format_help(), name
    for name in ("predict", "export"):  # a single output file is -o/--output
        assert "-o OUTPUT, --output OUTPUT" in subs[name].format_help(), name
    for name in ("download", "predict", "serve"):  # --timeout: seconds per URL fetch
        assert "--timeout" in subs[name].format_help(), name
    assert "--image-format" in subs["download"].format_help()
    assert set(subs) == set(STAGES + TOOLS) | {"models", "audit"} & set(subs)


def test_did_you_mean(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["trian"])
    assert exc.value.code == 2 and "did you mean train?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--modle", "x", "a.png"])
    assert exc.value.code == 2 and "did you mean --model?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", "d", "--out", "o", "--epochs", "3"])
    assert exc.value.code == 2 and "trainer.epochs=VALUE" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "trainer.epochz=3"]) == 2
    assert "did you mean 'trainer.epochs'?" in capsys.readouterr().err


def test_usage_errors_exit_2_in_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["download"], ["train"], ["predict"], ["serve"], ["evaluate"], ["export"],
                 ["demo", "--limit", "x"], ["config", "--nope"]):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        assert code == 2, argv
    capsys.readouterr()


def test_verbosity_flags_go_before_or_after_the_command() -> None:
    parser = build_parser()
    for argv in (["-q", "config"], ["config", "-q"]):
        args = parser.parse_args(argv)
        assert args.quiet == 1 and args.verbose == 0, argv
    assert parser.parse_args(["config", "-v"]).verbose == 1


def test_config_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    assert main(["config", "trainer.epochs=3", "model.arch=resnet18"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["epochs"] == 3 and printed["model"]["arch"] == "resnet18"
    assert printed == load_config(None, ["trainer.epochs=3", "model.arch=resnet18"]).to_plain()
    assert main(["config", "--documented"]) == 0
    assert "# Every key of the train config" in capsys.readouterr().out


def test_every_hidden_spelling_is_in_the_renamed_table_and_documented() -> None:
    """No undocumented alias: every option or positional hidden from --help is an old spelling in RENAMED."""
    from imgclf.cli._common import RENAMED

    hidden = set()
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if action.help == argparse.SUPPRESS and action.dest not in ("help", "verbose", "quiet"):
                hidden |= {(name, s) for s in action.option_strings} or {(name, action.metavar or action.dest)}
    assert hidden == set(RENAMED) - {("audit", "DATA_DIR")}  # audit's is told apart from its key=value args
    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    for (command, old), new in RENAMED.items():
        assert f"| `{command}` | `{old}` | `{new}` |" in doc, (command, old)


@pytest.mark.parametrize(("argv", "old", "new"), [
    (["evaluate", "runs/typo"], "MODEL as a positional argument", "--model"),
    (["evaluate", "--weights", "runs/typo"], "--weights", "--model"),
    (["export", "runs/typo"], "MODEL as a positional argument", "--model"),
    (["export", "--model", "runs/typo", "--out", "m.onnx"], "--out", "-o/--output"),
    (["predict", "x.png", "--model", "runs/typo", "--out", "p.csv"], "--out", "-o/--output"),
    (["serve", "--model", "runs/typo", "--fetch-timeout", "3"], "--fetch-timeout", "--timeout"),
    (["audit", "no_data_dir", "--out", "a"], "DATA_DIR as a positional argument", "--data"),
])
def test_old_spellings_still_work_and_say_so(argv: list[str], old: str, new: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == f"imgclf {argv[0]}: {old} is an old spelling of {new}; it still works, but use {new}"
    # ... and the command went on with it: the value reached the new name's check.
    assert code == 2 and len(lines) == 2 and ("runs/typo: no such model" in lines[1] or "no_data_dir" in lines[1])


def test_download_format_is_image_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from imgclf.cli import build_parser

    args = build_parser().parse_args(["download", "s.csv", "--out", str(tmp_path), "--format", "png"])
    assert args.image_format == "png"
    assert "--format is an old spelling of --image-format" in capsys.readouterr().err


def test_backend_choices_are_the_loaders_openers_read_only_when_needed() -> None:
    """--backend of predict and serve lists `inference.OPENERS` (a new backend is one edit there), and
    building the parser does not import the loader."""
    code = ("import sys\nfrom imgclf.cli import build_parser\nparser = build_parser()\n"
            "assert 'imgclf.inference' not in sys.modules\n"
            "from imgclf.inference._handle import OPENERS\n"
            "for command in ('predict', 'serve'):\n"
            "    action = next(a for a in parser._subparsers._group_actions[0].choices[command]._actions\n"
            "                  if a.dest == 'backend')\n"
            "    assert list(action.choices) == ['auto', *OPENERS], list(action.choices)\n"
            "    assert 'onnx' in action.choices and 'tensorrt' not in action.choices\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "ok", proc.stderr[-800:]
