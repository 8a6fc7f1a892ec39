"""The tl-steer command line: help texts and argument errors (the real sweep loads the default model)."""

from __future__ import annotations

from pathlib import Path

import pytest

import tl_steer.models
from tl_steer import cli


@pytest.fixture(autouse=True)
def no_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may load the default model (slow); fail loudly if one tries."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("test_cli must not load the default model")

    monkeypatch.setattr(tl_steer.models, "load_default_model", refuse)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, str, str]:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    assert "usage: tl-steer" in out
    assert "sweep" in out


def test_sweep_help_describes_prefodds(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["sweep", "--help"], capsys)
    assert code == 0
    assert "usage: tl-steer sweep" in out
    assert "PrefOdds" in out
    assert "L_n - L_p" in out
    for option in ("--concept", "--pairs", "--layer", "--ms", "--n-train", "--n-test", "--out", "--seed"):
        assert option in out


def test_no_command_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli([], capsys)
    assert code == 2
    assert "usage:" in err


@pytest.mark.parametrize(
    ("ms", "problem"),
    [
        ("a,b", "expected comma-separated numbers"),
        ("1,x", "expected comma-separated numbers"),
        ("", "the list of strengths is empty"),
        (" , ,", "the list of strengths is empty"),
        ("nan", "strengths must be finite"),
        ("1,inf", "strengths must be finite"),
    ],
)
def test_bad_strengths_are_argparse_errors(capsys: pytest.CaptureFixture[str], ms: str, problem: str) -> None:
    code, out, err = run_cli(["sweep", "--ms", ms], capsys)
    assert code == 2
    assert "--ms" in err
    assert problem in err
    assert out == ""  # nothing ran


def test_concept_and_pairs_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["sweep", "--concept", "formality", "--pairs", "p.jsonl"], capsys)
    assert code == 2
    assert "not allowed with argument" in err


def test_good_strengths_parse() -> None:
    args = cli.build_parser().parse_args(["sweep", "--ms", "-2,0, 1.5,", "--layer", "3"])
    assert args.ms == [-2.0, 0.0, 1.5]
    assert args.layer == 3
    assert args.concept == "sentiment"
    defaults = cli.build_parser().parse_args(["sweep"])
    assert defaults.ms == [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    assert defaults.pairs is None and defaults.layer is None


# Bad data is reported before the default model is loaded, so these run fast and offline.


def test_unknown_concept_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sweep", "--concept", "sarcasm"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("tl-steer: error: unknown built-in concept 'sarcasm'")
    assert "sentiment" in err and "Traceback" not in err
    assert out == ""


def test_missing_pairs_file_is_a_clean_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    assert cli.main(["sweep", "--pairs", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("tl-steer: error: no such pairs file")
    assert str(missing) in err
    assert out == ""


def test_bad_pairs_file_is_a_clean_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "positive": " b", "negative": " b"}\n', encoding="utf-8")
    assert cli.main(["sweep", "--pairs", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("tl-steer: error: ")
    assert f"{bad}, line 1" in err and "identical completions" in err
    assert out == ""


def test_unwritable_output_directory_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = cli.main(["sweep", "--out", str(blocker / "sub")])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot write to the output directory" in err


def test_report_help_lists_the_methods(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["report", "--help"], capsys)
    assert code == 0
    for word in ("--quick", "--methods", "--out", "--fresh", "resume", "diffmean", "cold_fd", "prompting"):
        assert word in out


def test_report_unknown_method_lists_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["report", "--methods", "diffmean", "magic"], capsys)
    assert code == 2
    assert "invalid choice: 'magic'" in err and "cold_kernel" in err and "split" in err


def test_report_bad_inputs_fail_before_the_model_loads(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["report", "--concept", "sarcasm", "--out", str(tmp_path / "r")]) == 2
    assert "unknown built-in concept 'sarcasm'" in capsys.readouterr().err
    few = tmp_path / "few.jsonl"
    few.write_text('{"prompt": "a", "positive": " b", "negative": " c"}\n', encoding="utf-8")
    assert cli.main(["report", "--pairs", str(few), "--out", str(tmp_path / "r")]) == 2
    assert "needs at least 8" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["report", "--out", str(blocker / "sub")]) == 2
    assert "cannot write to the output directory" in capsys.readouterr().err


def test_report_interrupted_says_how_to_resume(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tl_steer.report.pipeline as pipeline

    class FakeModel:
        class cfg:  # noqa: N801
            n_layers = 4

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load_model", lambda path, host=None: FakeModel())
    monkeypatch.setattr(cli, "_load_sae", lambda *args: (None, ""))
    monkeypatch.setattr(pipeline, "run_report", interrupted)
    assert cli.main(["report", "--quick", "--out", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and f"{tmp_path / 'r'}/cache" in err and "resume" in err


def test_sweep_runs_in_half_precision(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pandas as pd
    import torch
    from conftest import make_model

    loaded = []

    def tiny(host: str | None = None) -> object:
        model = make_model("llama", dtype=torch.float32)
        loaded.append(model)
        return model

    monkeypatch.setattr(tl_steer.models, "load_default_model", tiny)
    argv = ["sweep", "--dtype", "bfloat16", "--n-train", "8", "--n-test", "4", "--ms=-2,0,2"]
    assert cli.main([*argv, "--out", str(tmp_path / "bf16")]) == 0
    assert loaded[-1].cfg.dtype == torch.bfloat16
    assert cli.main([*argv[:1], *argv[3:], "--out", str(tmp_path / "fp32")]) == 0
    assert loaded[-1].cfg.dtype == torch.float32
    half, full = (pd.read_csv(tmp_path / d / "preference_utility.csv") for d in ("bf16", "fp32"))
    assert half["m"].tolist() == full["m"].tolist()
    # bfloat16 NLLs of ~6 nats are within 2 u = 0.8% of float32's; PrefOdds differ by a few hundredths.
    assert (half["pref_odds"] - full["pref_odds"]).abs().max() < 0.1
    code, _, err = run_cli(["sweep", "--dtype", "float8"], capsys)
    assert code == 2 and "invalid choice: 'float8'" in err


def test_with_dtype_refuses_unknown_names() -> None:
    with pytest.raises(tl_steer.TlSteerError, match="--dtype must be one of float32, float16, bfloat16"):
        cli.with_dtype(object(), "int8")


# ----- --host: the default model as a HookedTransformer or a TransformerBridge ---------------------------------


def test_an_unknown_host_is_refused_by_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("sweep", "report", "generate"):
        code, _, err = run_cli([command, "--host", "nnsight"], capsys)
        assert code == 2 and "invalid choice: 'nnsight' (choose from 'hooked', 'bridge')" in err


def test_sweep_runs_on_a_bridge(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch) -> None:
    import pandas as pd
    from conftest import make_bridge

    from tl_steer.hosts import is_bridge

    hosts: list[str | None] = []
    bridge = make_bridge("llama")

    def fake(host: str | None = None) -> object:
        hosts.append(host)
        return bridge

    monkeypatch.setattr(tl_steer.models, "load_default_model", fake)
    argv = ["sweep", "--host", "bridge", "--n-train", "6", "--n-test", "4", "--ms=-2,0,2", "--layer", "1"]
    assert cli.main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert hosts == ["bridge"] and is_bridge(bridge)
    table = pd.read_csv(tmp_path / "b" / "preference_utility.csv")
    # the steering reached the model: PrefOdds move with m (m = 0 is the clean model)
    by_m = table.groupby("m")["pref_odds"].mean()
    assert by_m[2.0] != pytest.approx(by_m[0.0]) and by_m[-2.0] != pytest.approx(by_m[0.0])
    assert "blocks.1.hook_resid_post" in capsys.readouterr().out


@pytest.mark.parametrize("host", [None, "hooked", "bridge"])
def test_report_and_generate_pass_the_host_on(tmp_path: Path, monkeypatch, host: str | None) -> None:
    import tl_steer.report.pipeline as pipeline

    hosts: list[str | None] = []

    class FakeModel:
        class cfg:  # noqa: N801
            n_layers = 4

    def fake(host: str | None = None) -> object:
        hosts.append(host)
        return FakeModel()

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # the model loaded: nothing more to see

    monkeypatch.setattr(tl_steer.models, "load_default_model", fake)
    monkeypatch.setattr(cli, "_load_sae", lambda *args: (None, ""))
    monkeypatch.setattr(pipeline, "run_report", stop)
    monkeypatch.setattr(tl_steer.methods, "diffmean", stop)
    flags = [] if host is None else ["--host", host]
    assert cli.main(["report", "--quick", *flags, "--out", str(tmp_path / "r")]) == 130
    assert cli.main(["generate", "hello", *flags, "--layer", "1"]) == 130
    expected = host or tl_steer.models.default_host()
    assert [tl_steer.models.check_host_name(h) for h in hosts] == [expected, expected]  # None: the default
