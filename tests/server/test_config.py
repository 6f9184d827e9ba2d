"""Server config: the example file loads as documented, a config round-trips through
TOML, and every typo or wrong type is refused naming the key (never a silent default)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from nnglass.server.config import (
    ConfigError,
    Limits,
    ModelConfig,
    Policy,
    ServerConfig,
    load_config,
    parse_config,
    quick_config,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "server.toml"
MINIMAL = '[[models]]\nname = "m"\nsource = "smollm2-135m"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def to_toml(cfg: ServerConfig) -> str:
    """A ServerConfig written back as TOML (the layout load_config reads)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (str, Path)):
            return json.dumps(str(v))
        return "[" + ", ".join(value(x) for x in v) + "]"

    def table(header: str, d: dict[str, Any]) -> list[str]:
        return [header, *(f"{k} = {value(v)}" for k, v in d.items() if not isinstance(v, dict))]

    server = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "models"}
    lines = table("[server]", server)
    for m in cfg.models:
        d = dataclasses.asdict(m)
        lines += table("[[models]]", d) + table("[models.policy]", d["policy"])
        lines += table("[models.policy.limits]", d["policy"]["limits"])
    return "\n".join(lines) + "\n"


# --- the example file ---------------------------------------------------------------------


def test_example_file_loads_as_documented() -> None:
    cfg = load_config(EXAMPLE)
    assert (cfg.host, cfg.port, cfg.max_queued_per_key, cfg.debug_checksums) == ("127.0.0.1", 8321, 16, False)
    assert cfg.home == Path("~/.nnglass").expanduser() and cfg.result_ttl_s == 86400.0
    assert cfg.max_request_bytes == 64 * 2**20
    open_model, provider = cfg.models
    assert open_model == ModelConfig(name="smollm2-135m", source="smollm2-135m")  # the defaults, spelled out
    assert provider.name == "provider-135m" and provider.source == "smollm2-135m"
    assert (provider.replicas, provider.threads) == (2, 4)
    p = provider.policy
    assert p.read == ["", "model.layers.*"] and p.write == ["model.layers.*"]
    assert not (p.weights_visible or p.gradients or p.module_calls)
    assert p.limits == Limits(prompt_tokens=2048, new_tokens=64, graph_nodes=5000, result_bytes=64 * 2**20,
                              run_seconds=30.0)
    assert cfg.model("provider-135m") is provider and cfg.model("nope") is None


def test_example_file_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLE)
    again = load_config(write(tmp_path, to_toml(cfg)))
    assert again == cfg


def test_every_default_survives_a_round_trip(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert load_config(write(tmp_path, to_toml(cfg))) == cfg
    assert cfg.models[0].policy == Policy() and cfg == dataclasses.replace(ServerConfig(), models=cfg.models)


def test_policy_summary_is_json() -> None:
    summary = load_config(EXAMPLE).models[1].policy.summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["weights_visible"] is False and summary["read"] == ["", "model.layers.*"]
    assert summary["limits"]["new_tokens"] == 64


# --- defaults and the quick config ---------------------------------------------------------


def test_defaults_allow_everything() -> None:
    p = Policy()
    assert p.read == ["**"] and p.write == ["**"] and p.weights_visible and p.gradients and p.module_calls
    assert Limits() == Limits(4096, 256, 20_000, 256 * 2**20, 60.0)


def test_quick_config_serves_the_model_by_its_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NNGLASS_HOME", str(tmp_path))
    cfg = quick_config("smollm2-135m", host="0.0.0.0", port=9000)
    assert (cfg.host, cfg.port, cfg.home) == ("0.0.0.0", 9000, tmp_path)
    assert cfg.models == [ModelConfig(name="smollm2-135m", source="smollm2-135m")]


def test_relative_home_is_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[server]\nhome = "state"\n' + MINIMAL))
    assert cfg.home == tmp_path / "state"


# --- mistakes are refused, naming the key -------------------------------------------------


@pytest.mark.parametrize(("text", "key"), [
    ('[server]\nprot = 1\n' + MINIMAL, "server.prot"),
    ('[sever]\n' + MINIMAL, "sever"),
    ('[server]\nmodels = []\n' + MINIMAL, "server.models"),
    (MINIMAL + 'replica = 2\n', "models[0].replica"),
    (MINIMAL + '[models.policy]\nweigths_visible = false\n', "models[0].policy.weigths_visible"),
    (MINIMAL + '[models.policy]\nreads = ["x"]\n', "models[0].policy.reads"),
    (MINIMAL + '[models.policy.limits]\nprompt_tokns = 9\n', "models[0].policy.limits.prompt_tokns"),
    (MINIMAL + MINIMAL.replace('"m"', '"n"') + 'polcy = 1\n', "models[1].polcy"),
])
def test_unknown_keys_are_refused(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match="unknown key") as err:
        load_config(write(tmp_path, text))
    assert f"{key}: unknown key" in str(err.value) and str(tmp_path) in str(err.value)


@pytest.mark.parametrize(("text", "key"), [
    ('[server]\nport = "8321"\n' + MINIMAL, "server.port"),
    ('[server]\nport = true\n' + MINIMAL, "server.port"),
    ('[server]\ndebug_checksums = 1\n' + MINIMAL, "server.debug_checksums"),
    ('[server]\nhome = 3\n' + MINIMAL, "server.home"),
    ('[server]\nresult_ttl_s = nan\n' + MINIMAL, "server.result_ttl_s"),
    (MINIMAL + 'replicas = 1.5\n', "models[0].replicas"),
    (MINIMAL + '[models.policy]\nweights_visible = "false"\n', "models[0].policy.weights_visible"),
    (MINIMAL + '[models.policy]\ngradients = 0\n', "models[0].policy.gradients"),
    (MINIMAL + '[models.policy]\nread = "**"\n', "models[0].policy.read"),
    (MINIMAL + '[models.policy]\nwrite = ["a", 1]\n', "models[0].policy.write"),
    (MINIMAL + '[models.policy.limits]\nrun_seconds = "60"\n', "models[0].policy.limits.run_seconds"),
    (MINIMAL + 'policy = 3\n', "models[0].policy"),
    ('server = 1\n' + MINIMAL, "server"),
    ('models = 1\n', "declare at least one model"),
])
def test_wrong_types_are_refused(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert key in str(err.value)


@pytest.mark.parametrize(("text", "message"), [
    ("", "declare at least one model"),
    ('[[models]]\nname = "m"\n', "models[0].source: missing"),
    ('[[models]]\nsource = "m"\n', "models[0].name: missing"),
    ('[[models]]\nname = ""\nsource = "m"\n', "models[0].name: must not be empty"),
    (MINIMAL + MINIMAL, "'m' repeated"),
    (MINIMAL + 'dtype = "fp32"\n', "models[0].dtype: 'fp32' is not one of"),
    (MINIMAL + 'replicas = 0\n', "models[0].replicas: must be > 0"),
    (MINIMAL + 'threads = -1\n', "models[0].threads: must be > 0"),
    (MINIMAL + 'join_tokens = 0\n', "models[0].join_tokens: must be > 0"),
    (MINIMAL + 'join_wait_s = 0.5\n', "models[0].join_wait_s: must be 0..0.25 seconds"),
    (MINIMAL + '[models.policy.limits]\nnew_tokens = 0\n', "models[0].policy.limits.new_tokens: must be > 0"),
    ('[server]\nport = 70000\n' + MINIMAL, "server.port: must be 0..65535"),
    ('[server]\nmax_queued_per_key = 0\n' + MINIMAL, "server.max_queued_per_key: must be > 0"),
    (MINIMAL + '[models.policy]\nread = ["layers.*foo"]\n', "models[0].policy.read[0]: bad pattern"),
    (MINIMAL + '[models.policy]\nwrite = ["a..b"]\n', "models[0].policy.write[0]: bad pattern"),
    (MINIMAL + '[models.policy]\nread = ["a.b-c"]\n', "bad pattern"),
    ("[[models]\n", "not valid TOML"),
    ('[server]\nengine = "dask"\n' + MINIMAL, "server.engine: 'dask' is not one of subprocess, ray"),
    (MINIMAL + "resources = {num_gpus = 1}\n", 'models[0].resources: only for engine = "ray"'),
    ('[server]\nengine = "ray"\n' + MINIMAL + "resources = {num_gpus = -1}\n",
     "models[0].resources.num_gpus: must be >= 0"),
    ('[server]\nengine = "ray"\n' + MINIMAL + 'resources = {gpu = "one"}\n',
     "models[0].resources.gpu: must be a number"),
    ('[server]\nengine = "ray"\n' + MINIMAL + "resources = 2\n", "models[0].resources: must be a table"),
])
def test_bad_values_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value)


def test_ray_engine_and_resources(tmp_path: Path) -> None:
    text = ('[server]\nengine = "ray"\nray_address = "127.0.0.2:6379"\nray_node_ip = "127.0.0.2"\n'
            + MINIMAL + "threads = 3\nresources = {num_gpus = 1, node_a = 0.5}\n")
    cfg = load_config(write(tmp_path, text))
    assert (cfg.engine, cfg.ray_address, cfg.ray_node_ip) == ("ray", "127.0.0.2:6379", "127.0.0.2")
    assert cfg.models[0].resources == {"num_gpus": 1.0, "node_a": 0.5}
    from nnglass.server.ray_worker import actor_options

    assert actor_options(cfg.models[0]) == {"num_cpus": 3, "num_gpus": 1.0, "resources": {"node_a": 0.5}}


def test_serve_dash_dash_ray_picks_the_ray_engine(tmp_path: Path) -> None:
    from nnglass.cli import _server_config

    path = write(tmp_path, MINIMAL)
    args = argparse.Namespace(config=path, model=None, host=None, port=None, ray="127.0.0.2:6379")
    cfg = _server_config(args)
    assert (cfg.engine, cfg.ray_address) == ("ray", "127.0.0.2:6379")
    args.ray = None
    assert _server_config(args).engine == "subprocess"


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read server config"):
        load_config(tmp_path / "nope.toml")


def test_patterns_are_checked_when_built_in_code_too() -> None:
    with pytest.raises(ConfigError, match="bad pattern"):
        Policy(read=["model.layer*"])
    Policy(read=["", "**", "model.layers.*", "model.**.mlp", "0"])


def test_parse_config_takes_parsed_toml() -> None:
    cfg = parse_config({"models": [{"name": "a", "source": "b", "policy": {"gradients": False}}]})
    assert cfg.models[0].policy.gradients is False and cfg.models[0].policy.read == ["**"]
