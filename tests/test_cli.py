"""The --config flag of every command line (configs/cli.py): overrides reach the config, and a bad
key or value fails in one line that says what is wrong, not in a traceback."""
import ast
import pathlib
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "configs" / "demo.py")


def parse(*args: str, config: str = DEMO, lock_config: bool = True) -> flags.FlagValues:
    """Parses `--config CONFIG ARGS` through the real flag machinery, on fresh flag values."""
    argv = ["prog", "--config", config, *args]
    values = flags.FlagValues()
    cli.define_config_flag("", lock_config=lock_config, flag_values=values, sys_argv=argv)
    values(argv)
    return values


@pytest.mark.parametrize("config", [DEMO, DEMO + ":arg"])
def test_declared_key_override_reaches_the_config(config):
    """--config.data.strict=True (issue 11, defect 4: the key was once undeclared) is parsed and
    typed by the real flag parser, with or without a :ARG suffix, and the launchers still read the
    file and overrides back from the flag."""
    values = parse("--config.data.strict=True", "--config.optimizer.lr=2e-4", config=config)
    assert values.config.data.strict is True and values.config.optimizer.lr == 2e-4
    assert config_flags.get_config_filename(values["config"]) == config
    assert config_flags.get_override_values(values["config"]) == {"data.strict": True, "optimizer.lr": 2e-4}


@pytest.mark.parametrize("key, nearest", [("data.strcit", "data.strict"), ("dta.root", "data.root"),
                                          ("lr", "optimizer.lr"), ("data.root.x", "data.root")])
def test_unknown_key_is_a_flags_error_naming_the_nearest_keys(key, nearest):
    """A misspelt key, a misspelt section, a key without its section and a key below a leaf all
    raise a flags.Error (which app.run prints as one line), the nearest valid key first."""
    with pytest.raises(flags.IllegalFlagValueError) as e:
        parse(f"--config.{key}=1")
    message = str(e.value)
    assert f"unknown config key {key!r}" in message and "\n" not in message
    assert message.split("nearest: ")[1].split(", ")[0] == nearest


def test_bad_value_keeps_its_message():
    """A value of the wrong type names the flag and the reason."""
    with pytest.raises(flags.IllegalFlagValueError, match=r"--config.optimizer.lr=abc: .*float"):
        parse("--config.optimizer.lr=abc")
    with pytest.raises(flags.IllegalFlagValueError, match=r"--config.data.strict=maybe: .*boolean"):
        parse("--config.data.strict=maybe")


@pytest.mark.parametrize("lock_config", [True, False])
def test_lock_config_is_kept(lock_config):
    """lock_config decides, as in DEFINE_config_file, whether code may add keys after parsing."""
    config = parse(lock_config=lock_config).config
    if lock_config:
        with pytest.raises(AttributeError):
            config.data.new_key = 1
    else:
        config.data.new_key = 1
        assert config.data.new_key == 1


def test_no_command_line_defines_the_config_flag_itself():
    """Every command line goes through cli.define_config_flag, so every one reports bad keys."""
    offenders = []
    for path in sorted(p for pkg in ("launch", "tools", "vla") for p in (ROOT / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "DEFINE_config_file":
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


def test_trainer_reports_an_unknown_key_in_a_few_lines(tmp_path):
    """The real CLI: non-zero exit status, the bad key and a valid one named, no traceback."""
    result = subprocess.run([sys.executable, "-m", "vla.train", "--config", "configs/demo.py", "--workdir",
                             str(tmp_path), "--config.foo=1"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "unknown config key 'foo'" in result.stderr and "nearest: " in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) <= 5, result.stderr
    assert not any(tmp_path.iterdir())
