import json
import re
import subprocess
import sys


def test_help_is_instant_and_lists_every_command():
    code = "import sys, bincount.cli; print(sorted(m for m in ('torch','sagemaker','boto3','moto','PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    res = subprocess.run([sys.executable, "-m", "bincount", "--help"], capture_output=True, text=True, check=True)
    lines = {line.split()[0]: line for line in res.stdout.split("Commands:")[1].splitlines() if line.strip()}
    for command in ("synth", "fetch", "split", "upload", "tune", "train", "evaluate", "deploy", "predict",
                    "audit", "undeploy", "serve", "status", "config"):
        assert command in lines
        assert not lines[command].endswith("..."), lines[command]  # every description fits on its line


def test_bad_config_exits_1_with_one_line(cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("split:\n  train: 0.9\n")
    res = cli("config", "--config", cfg)
    assert res.exit_code == 1
    assert "split ratios must sum to 1" in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_config_json_and_set(cli, tmp_path):
    res = cli("config", "--json", "--workdir", tmp_path, "--set", "train.epochs=7", "--set", "deploy.mode=serverless")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["settings"]["train"]["epochs"] == 7
    assert data["settings"]["deploy"]["mode"] == "serverless"
    assert data["settings"]["workdir"] == str(tmp_path)


def test_bad_set_option(cli):
    res = cli("config", "--set", "train.epochs")
    assert res.exit_code == 1
    assert "KEY=VALUE" in res.stderr


def test_error_with_brackets_is_printed_verbatim(cli, tmp_path):
    res = cli("config", "--config", tmp_path / "[bold]x.yaml")
    assert res.exit_code == 1
    assert "[bold]x.yaml not found" in res.stderr


def test_every_command_runs_one_stage_from_the_table():
    from bincount.cli import BACKENDS, COMMANDS, app, stage

    commands = {info.name or info.callback.__name__ for info in app.registered_commands}
    assert commands == set(COMMANDS)
    for command in COMMANDS:
        for backend in BACKENDS:
            assert callable(stage(command, backend))
    assert stage("train", "sagemaker").__module__ == "bincount.backends.sagemaker.training"


def test_a_command_without_the_chosen_backend_is_a_one_line_error(cli, one_line_error, monkeypatch, tmp_path):
    from bincount import cli as cli_module

    monkeypatch.setitem(cli_module.COMMANDS, "train", {"local": cli_module.COMMANDS["train"]["local"]})
    res = cli("train", "--backend", "sagemaker", "--workdir", tmp_path)
    one_line_error(res, "`bincount train` has no sagemaker backend: use --backend local")


def test_version_and_short_help(cli):
    from importlib.metadata import version

    res = cli("--version")
    assert res.exit_code == 0 and res.stdout == f"bincount {version('bincount')}\n"
    res = cli("fetch", "-h")
    assert res.exit_code == 0 and res.stdout.splitlines()[0].endswith(" fetch [OPTIONS]")


def test_every_help_page_has_examples_and_readable_metavars(cli):
    import typer

    from bincount.cli import app

    group = typer.main.get_command(app)
    for name in group.list_commands(None):
        if name in ("--install-completion", "--show-completion"):
            continue
        page = cli(name, "--help").stdout
        assert "Examples:\n    bincount " in page, name
        assert not re.search(r"-[\w-]+ <", page), (name, page)  # metavars say what to give, not <str> or <list[str]>


def test_quiet_silences_progress_but_not_errors(cli, tmp_path):
    res = cli("-q", "synth", "--workdir", tmp_path, "-n", 2, "--image-size", 32)
    assert res.exit_code == 0 and res.stderr == ""
    res = cli("-q", "status", "--workdir", tmp_path / "typo")
    assert res.exit_code == 1 and "work dir" in res.stderr and "does not exist" in res.stderr


def test_tables_are_plain_ascii_when_piped(cli, tmp_path):
    res = cli("synth", "--workdir", tmp_path, "-n", 2, "--image-size", 32)
    assert res.exit_code == 0
    assert "images" in res.stdout and not any(ch in res.stdout for ch in "┏━┃│└─")


def test_conflicting_set_and_env_are_one_line(cli, one_line_error, monkeypatch):
    one_line_error(cli("config", "--set", "train=3", "--set", "train.epochs=3"), "conflict")
    monkeypatch.setenv("BINCOUNT_TRAIN", "3")
    monkeypatch.setenv("BINCOUNT_TRAIN__EPOCHS", "3")
    one_line_error(cli("config"), "BINCOUNT_TRAIN", "conflict")


def test_non_utf8_config_and_lr_inf_are_one_line(cli, one_line_error, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"train:\n  lr: \xe9\n")
    one_line_error(cli("config", "--config", cfg), "not UTF-8")
    one_line_error(cli("config", "--set", "train.lr=inf"), "train.lr", "finite")
    one_line_error(cli("train", "--workdir", tmp_path, "--lr", "nan"), "train.lr", "finite")


def test_a_message_with_a_newline_stays_on_one_line(cli, one_line_error):
    one_line_error(cli("config", "--set", "train.epochs\nx=3"), "unknown key")


def test_a_log_line_with_a_closing_tag_in_a_path_is_printed_as_it_is(capsys):
    from bincount.console import log

    log("predicting with the model in /tmp/odd[/]dir")
    assert "/tmp/odd[/]dir" in capsys.readouterr().err


# -- conventions (issue 23.8) ------------------------------------------------------------------------
def test_piped_tables_keep_long_paths_whole(cli, tmp_path):
    deep = tmp_path / ("d" * 120)
    res = cli("synth", "--workdir", deep, "-n", 2, "--image-size", 32)
    assert res.exit_code == 0 and str(deep / "synth") in res.stdout and "…" not in res.stdout


def test_quiet_and_verbose_work_after_the_command_too(cli, tmp_path):
    res = cli("synth", "--workdir", tmp_path, "-n", 2, "--image-size", 32, "-q")
    assert res.exit_code == 0 and res.stderr == ""
    res = cli("status", "--workdir", tmp_path / "typo", "--quiet", "-v")
    assert res.exit_code == 1 and "does not exist" in res.stderr


def test_usage_errors_exit_2_as_documented(cli):
    res = cli("config", "--bogus")
    assert res.exit_code == 2 and "No such option: --bogus" in res.stderr
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "2 a usage error" in readme


def test_a_misspelled_setting_key_gets_a_suggestion(cli, one_line_error, tmp_path):
    one_line_error(cli("config", "--workdir", tmp_path, "--set", "train.epoch=3"), "did you mean train.epochs?")
    one_line_error(cli("config", "--workdir", tmp_path, "--set", "trian.epochs=3"), "did you mean train?")


def test_argument_help_shows_no_python_type(cli):
    page = cli("predict", "--help").stdout
    assert "IMAGE" in page and "list[str]" not in page


def complete(line: str) -> list[str]:
    from typer.testing import CliRunner

    from bincount.cli import app

    words = line.split(" ")
    res = CliRunner().invoke(app, [], prog_name="bincount", env={
        "_BINCOUNT_COMPLETE": "complete_bash", "COMP_WORDS": line, "COMP_CWORD": str(len(words) - 1)})
    return res.stdout.split()


def test_completion_completes_option_values():
    assert complete("bincount train --backend ") == ["local", "sagemaker"]
    assert complete("bincount train --arch mobile") == ["mobilenet_v3_small", "mobilenet_v3_large"]
    assert complete("bincount predict -f ") == ["table", "json", "csv"]
    assert "train.epochs=" in complete("bincount train --set train.ep")


def test_arch_completion_lists_the_containers_archs():
    from bincount.container.net import ARCHS

    assert complete("bincount train --arch ") == list(ARCHS)


def test_options_name_the_setting_they_set_and_its_default(cli):
    page = " ".join(cli("train", "--help").stdout.split())
    assert "[setting train.epochs, default 20]" in page and "[setting train.lr, default 0.001]" in page
    assert "[setting backend]" in page  # its help already says the default
    page = " ".join(cli("audit", "--help").stdout.split())
    assert "[setting audit.workers" in page
