"""Config: defaults, the file `init` writes, every shipped config file, and clear errors."""

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from loop import config as configuration
from loop.config import Config, ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_every_field_has_a_help_text():
    for section in (getattr(Config(), name) for name in configuration._sections()):
        for f in dataclasses.fields(section):
            assert f.metadata.get("help"), f"{type(section).__name__}.{f.name} has no help text"


def test_rendered_file_loads_back_to_the_defaults(tmp_path):
    path = tmp_path / "alignloop.toml"
    path.write_text(configuration.render())
    cfg = configuration.load(path)
    assert configuration.to_dict(cfg) == configuration.to_dict(Config())
    assert cfg.data_dir == (tmp_path / "alignloop-data").resolve()
    assert cfg.db_path.parent == cfg.data_dir


@pytest.mark.parametrize("path", sorted(REPO.glob("ops/configs/*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_file_loads(path):
    configuration.load(path)


def test_shipped_config_files_exist():
    assert list(REPO.glob("ops/configs/*.toml")), "ops/configs/ should ship at least one config"


def test_overrides_take_toml_values_and_bare_strings(tmp_path):
    cfg = configuration.load(None, ["gateway.port=8123", "model.served_name=mine", "store.heldout_share=0.2"])
    assert (cfg.gateway.port, cfg.model.served_name, cfg.store.heldout_share) == (8123, "mine", 0.2)


def test_no_file_means_defaults_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = configuration.load()
    assert cfg.path is None and cfg.data_dir == (tmp_path / "alignloop-data").resolve()


@pytest.mark.parametrize("text, message", [
    ("[gateway]\nport = 'abc'\n", "[gateway] port: expected an integer, got 'abc'"),
    ("[gateway]\nport = 70000\n", "[gateway]: port must be from 1 to 65535"),
    ("[gatway]\nport = 1\n", "unknown section [gatway]"),
    ("[engine]\nkv_cache = 2\n", "[engine]: unknown key 'kv_cache'"),
    ("[store]\nheldout_share = 1.5\n", "heldout_share must be in [0, 1)"),
    ("[model]\nserved_name = true\n", "[model] served_name: expected a string, got True"),
    ("[gateway\nport = 1\n", "not valid TOML"),
    ("gateway = 3\n", "[gateway]: expected a table"),
])
def test_bad_files_name_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "alignloop.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        configuration.load(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_and_bad_override_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        configuration.load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"defaults with --set ppo.rollouts=bogus: \[ppo\]: rollouts must be"):
        configuration.load(None, ["ppo.rollouts=bogus"])  # the error names the --set, not a file, as the culprit
    with pytest.raises(ConfigError, match="expected section.key=value"):
        configuration.load(None, ["port=1"])


def test_ints_are_accepted_for_floats(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[engine]\nstartup_timeout_s = 60\n")
    assert configuration.load(path).engine.startup_timeout_s == 60.0


def test_init_for_a_real_model_writes_a_gate_that_is_not_the_demo_rule(tmp_path):
    model = tmp_path / "Qwen2.5-0.5B-Instruct"
    model.mkdir()
    path = tmp_path / "alignloop.toml"
    done = subprocess.run([sys.executable, "-m", "loop.cli", "--config", str(path), "init", "--set",
                           f"model.base={model}"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    gate = tomllib.loads(path.read_text())["gate"]
    assert gate["judge"] == "auto" and gate["judge_url"] == ""  # the refreshed reward model, or held for a person
    assert configuration.load(path).gate.judge == "auto"
    for shipped in ("gpu.toml", "qwen-cpu.toml"):  # each says which judge and why
        text = (REPO / "ops" / "configs" / shipped).read_text()
        section = text[text.index("[gate]"):]
        assert "judge =" in section and "# " in section and "demo" not in tomllib.loads(text)["gate"]["judge"]


def test_status_reads_plainly_with_no_config_file_and_no_gateway(tmp_path, capsys, monkeypatch):
    from loop.cli import main
    from tests.serving import free_port

    monkeypatch.chdir(tmp_path)  # no alignloop.toml here: the built-in defaults
    assert main(["--set", f"data.dir={tmp_path / 'data'}", "--set", f"gateway.port={free_port()}", "status"]) == 0
    out = capsys.readouterr().out
    assert "previous: none" in out and "config: none (built-in defaults" in out, out
    assert "None" not in out, out


def test_status_into_a_pipe_closed_early_ends_quietly(tmp_path):
    """`alignloop status | head -3` ended with 'alignloop: error: [Errno 32] Broken pipe'."""
    from tests.serving import free_port

    proc = subprocess.Popen([sys.executable, "-m", "loop.cli", "--set", f"data.dir={tmp_path / 'data'}", "--set",
                             f"gateway.port={free_port()}", "status"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_init_while_the_store_is_in_use_writes_no_config(tmp_path):
    """It wrote alignloop.toml, then failed on the store's lock, and every later command read the
    half-made config."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "loop.cli", "--set", f"data.dir={data}", "init",
                    "--config", str(tmp_path / "first.toml")], check=True, capture_output=True, cwd=tmp_path, timeout=120)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from store import Store; "
                               f"s = Store({str(data / 'alignloop.duckdb')!r}); print('open', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "open"
        done = subprocess.run([sys.executable, "-m", "loop.cli", "--set", f"data.dir={data}", "init"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "alignloop.toml").exists(), done.stdout
