"""The tl-steer command line: help texts and argument errors (the real sweep loads the default model)."""

from __future__ import annotations

import pytest

from tl_steer import cli


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
    for option in ("--concept", "--pairs", "--layer", "--ms", "--n-train", "--n-test", "--csv", "--seed"):
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
    code, _, err = run_cli(["sweep", "--concept", "sentiment", "--pairs", "p.jsonl"], capsys)
    assert code == 2
    assert "not allowed with argument" in err


def test_good_strengths_parse() -> None:
    args = cli.build_parser().parse_args(["sweep", "--ms", "-2,0, 1.5,", "--layer", "3"])
    assert args.ms == [-2.0, 0.0, 1.5]
    assert args.layer == 3
    assert args.concept == "sentiment"
    defaults = cli.build_parser().parse_args(["sweep"])
    assert defaults.ms == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert defaults.pairs is None and defaults.layer is None
