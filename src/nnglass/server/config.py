"""The server's configuration: which models it serves and what each one's policy exposes.

Invariant: a config file either loads exactly as written or fails naming the key. An
unknown key, a wrong type or a malformed glob pattern is an error, never a default: a
typo such as `weigths_visible = false` must not leave the weights visible. Defaults
allow everything, which suits a laptop serving its own model (`nnglass serve --model
X`); a shared server should declare each model's policy. `examples/server.toml`
documents every key.

Glob patterns name dotted module paths per component: `*` is exactly one component,
`**` zero or more; the root module's path is "" (matched only by "" or "**").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import _config
from ..errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

MiB = 2**20
DTYPES = ("float32", "float16", "bfloat16", "float64")
ATTENTION = ("", "eager", "sdpa")  # a model's `attention`: how transformers computes attention
ENGINES = ("subprocess", "ray")


@dataclass(frozen=True)
class Limits:
    """Per-request bounds. Tokens are counted per trace (a session's traces each)."""

    prompt_tokens: int = 4096  # sum over a trace's invokes of their input_ids' numel
    new_tokens: int = 256  # max_new_tokens of a generate
    graph_nodes: int = 20_000  # a session counts all its traces' nodes
    result_bytes: int = 256 * MiB
    run_seconds: float = 60.0
    op_bytes: int = 1024 * MiB  # the largest value one op may produce
    live_bytes: int = 4096 * MiB  # the most bytes the values of one run may hold at once


@dataclass(frozen=True)
class Policy:
    """What a model exposes. Enforced by `server.policy.check_policy` before a job runs."""

    read: list[str] = field(default_factory=lambda: ["**"])
    write: list[str] = field(default_factory=lambda: ["**"])
    weights_visible: bool = True
    gradients: bool = True
    module_calls: bool = True
    # With weights hidden: may sites whose value is a pure lookup of weights (an
    # embedding's output, the first block's input, ...) be read? See server/exposure.py.
    expose_embeddings: bool = False
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        for name in ("read", "write"):
            for pattern in getattr(self, name):
                check_pattern(pattern, f"policy.{name}")

    def summary(self) -> dict[str, Any]:
        """JSON-able, for `GET /v1/models`."""
        return {
            "read": list(self.read),
            "write": list(self.write),
            "weights_visible": self.weights_visible,
            "gradients": self.gradients,
            "module_calls": self.module_calls,
            "expose_embeddings": self.expose_embeddings,
            "limits": asdict(self.limits),
        }


@dataclass(frozen=True)
class ModelConfig:
    name: str  # what clients call it (`LanguageModel(name)`)
    source: str  # built-in name, hub id or local directory
    dtype: str = "float32"
    # The attention implementation to load with ("" is transformers' default, sdpa): "eager"
    # forms the probabilities, so `.source.softmax_0` reads them (graph/source.py).
    attention: str = ""
    replicas: int = 1
    shards: int = 1  # > 1: each replica runs tensor-parallel over this many rank processes (shards/)
    # engine = "ray", shards > 1: how the ranks' placement group spreads them over nodes
    # (Ray's strategies: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD: one rank per node).
    shard_placement: str = "PACK"
    # Pipeline placement on a multi-GPU machine: transformers' `device_map` ("auto",
    # "balanced", "sequential"), the model's layers split across the devices. "": none.
    device_map: str = ""
    threads: int = 2  # torch threads per replica, always set explicitly
    share_jobs: int = 32  # co-tenancy: most queued jobs merged into one forward pass (1: never)
    share_tokens: int = 4096  # most padded tokens (rows x widest prompt) in one shared pass
    share_wait_s: float = 0.005  # how long a pass that is not full waits for more jobs to arrive
    # Generate jobs joining a running generation (server/generation.py) at a step boundary
    # are gathered while more keep arriving, gaps under join_wait_s (the batch waits
    # meanwhile, at most 20x it); while rows run, a step runs at most join_tokens padded
    # tokens of their prompts (the rest at the next steps, before the decode while more rows
    # wait than run); with none running, all of them at once.
    join_wait_s: float = 0.02
    join_tokens: int = 128
    # How long a pass may wait for the submissions this server is already taking in when it
    # is due (jobs sent together run together: server/arrivals.py); 0: never.
    share_settle_s: float = 0.5
    policy: Policy = field(default_factory=Policy)
    # engine = "ray": what each replica's actor asks of its node (num_cpus, num_gpus, memory,
    # or any custom resource of `ray start --resources`); num_cpus defaults to `threads`.
    resources: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8321
    home: Path = field(default_factory=_config.home)  # database, results
    # Where jobs and keys live: "" is SQLite in `home`; "postgresql://..." is a shared
    # database several frontends may use (server/stores.py).
    database: str = ""
    # Where graphs and results live: "" is `home`/jobs; "s3://bucket/prefix" is
    # S3-compatible storage (endpoint and credentials from the AWS_* variables).
    results: str = ""
    result_ttl_s: float = 86_400.0
    max_request_bytes: int = 64 * MiB
    debug_checksums: bool = False
    max_queued_per_key: int = 16  # quota: jobs one API key may have waiting
    engine: str = "subprocess"  # where replicas run: "subprocess" (this machine) or "ray" (a cluster)
    ray_address: str = "auto"  # engine = "ray": the cluster's GCS, "HOST:PORT" or "auto" (this machine's)
    ray_node_ip: str = ""  # engine = "ray": this machine's address as the cluster sees it ("": Ray's guess)
    models: list[ModelConfig] = field(default_factory=list)

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


def check_pattern(pattern: object, where: str) -> None:
    """A glob is "" (the root), or components that are names, indices, `*` or `**`."""
    if not isinstance(pattern, str):
        raise ConfigError(f"{where}: patterns must be strings, got {pattern!r}")
    if pattern == "":
        return
    for part in pattern.split("."):
        if part in ("*", "**"):
            continue
        if not part or "*" in part or not (part.isidentifier() or part.isdigit()):
            raise ConfigError(f"{where}: bad pattern {pattern!r}: each dotted component must be a "
                              "module name, an index, `*` (one component) or `**` (any number)")


def quick_config(model: str, host: str = "127.0.0.1", port: int = 8321) -> ServerConfig:
    """`nnglass serve --model X`: serve X as X, everything allowed (a laptop's own model)."""
    return ServerConfig(host=host, port=port, models=[ModelConfig(name=model, source=model)])


def load_config(path: str | Path) -> ServerConfig:
    """Read a TOML config (layout: `examples/server.toml`). Relative `home` is taken
    relative to the file's folder."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read server config {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return parse_config(data, base=path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e.message}") from None


def parse_config(data: dict[str, Any], base: Path | None = None) -> ServerConfig:
    """A ServerConfig from parsed TOML (a dict), checked key by key."""
    _known(data, {"server", "models"}, "")
    server = _table(data.get("server", {}), "server")
    kw = _fields(server, ServerConfig, "server", drop=("models",), types={"home": "str"})
    if "home" in kw:
        home = Path(kw["home"]).expanduser()
        kw["home"] = base / home if base is not None and not home.is_absolute() else home
    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError("declare at least one model: a `[[models]]` table with name and source")
    models = [_model(m, f"models[{i}]") for i, m in enumerate(raw_models)]
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"models: names must be unique, {', '.join(map(repr, dupes))} repeated")
    cfg = ServerConfig(models=models, **kw)
    if cfg.engine not in ENGINES:
        raise ConfigError(f"server.engine: {cfg.engine!r} is not one of {', '.join(ENGINES)}")
    for i, m in enumerate(models):
        if m.resources and cfg.engine != "ray":
            raise ConfigError(f'models[{i}].resources: only for engine = "ray" (this server runs '
                              f"{cfg.engine} workers)")
    _positive(cfg, "server", ("result_ttl_s", "max_request_bytes", "max_queued_per_key"))
    if cfg.database and not cfg.database.startswith(("postgresql://", "postgres://")):
        scheme = cfg.database.split("://")[0]
        raise ConfigError(f"server.database: {scheme!r} is not a database this server knows; give "
                          "\"postgresql://USER@HOST:PORT/DB\", or leave it out for SQLite in home")
    if cfg.results and not cfg.results.startswith("s3://"):
        raise ConfigError(f"server.results: {cfg.results!r} is not an s3://bucket/prefix URL; "
                          "leave it out for a folder in home")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"server.port: must be 0..65535, got {cfg.port}")
    return cfg


def _model(raw: object, where: str) -> ModelConfig:
    table = _table(raw, where)
    for key in ("name", "source"):
        if key not in table:
            raise ConfigError(f"{where}.{key}: missing (required)")
    kw = _fields(table, ModelConfig, where, nested=("policy", "resources"))
    if not kw["name"]:
        raise ConfigError(f"{where}.name: must not be empty")
    if kw.get("dtype", "float32") not in DTYPES:
        raise ConfigError(f"{where}.dtype: {kw['dtype']!r} is not one of {', '.join(DTYPES)}")
    if kw.get("attention", "") not in ATTENTION:
        allowed = ", ".join(map(repr, ATTENTION))
        raise ConfigError(f"{where}.attention: {kw['attention']!r} is not one of {allowed}")
    policy = _policy(table.get("policy", {}), f"{where}.policy")
    resources = _resources(table.get("resources", {}), f"{where}.resources")
    cfg = ModelConfig(policy=policy, resources=resources, **kw)
    _positive(cfg, where, ("replicas", "shards", "threads", "share_jobs", "share_tokens",
                           "join_tokens"))
    if cfg.device_map and cfg.shards > 1:
        raise ConfigError(f"{where}: device_map and shards > 1 are two ways to split a model; give one")
    if cfg.shard_placement not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise ConfigError(f"{where}.shard_placement: {cfg.shard_placement!r} is not one of PACK, SPREAD, "
                          "STRICT_PACK, STRICT_SPREAD")
    if not 0 <= cfg.share_wait_s <= 1:
        raise ConfigError(f"{where}.share_wait_s: must be 0..1 seconds, got {cfg.share_wait_s}")
    if not 0 <= cfg.join_wait_s <= 0.25:  # the running batch waits, at most WAIT_ROUNDS times this
        raise ConfigError(f"{where}.join_wait_s: must be 0..0.25 seconds, got {cfg.join_wait_s}")
    if not 0 <= cfg.share_settle_s <= 5:
        raise ConfigError(f"{where}.share_settle_s: must be 0..5 seconds, got {cfg.share_settle_s}")
    return cfg


def _policy(raw: object, where: str) -> Policy:
    table = _table(raw, where)
    kw = _fields(table, Policy, where, nested=("limits",))
    for key in ("read", "write"):
        for i, pattern in enumerate(kw.get(key, [])):
            check_pattern(pattern, f"{where}.{key}[{i}]")
    limits = Limits(**_fields(_table(table.get("limits", {}), f"{where}.limits"), Limits, f"{where}.limits"))
    _positive(limits, f"{where}.limits", tuple(f.name for f in fields(Limits)))
    return Policy(limits=limits, **kw)


def _resources(raw: object, where: str) -> dict[str, float]:
    """A replica's resources: names to finite amounts >= 0 (Ray checks they exist)."""
    out = {}
    for name, amount in _table(raw, where).items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount):
            raise ConfigError(f"{where}.{name}: must be a number, got {amount!r}")
        if amount < 0:
            raise ConfigError(f"{where}.{name}: must be >= 0, got {amount!r}")
        out[name] = float(amount)
    return out


# --- checking, key by key ---------------------------------------------------------------


def _table(raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table, got {type(raw).__name__}")
    return raw


def _known(table: dict[str, Any], known: set[str], where: str) -> None:
    for key in table:
        if key not in known:
            name = f"{where}.{key}" if where else key
            raise ConfigError(f"{name}: unknown key (a typo?); known keys here: {', '.join(sorted(known))}")


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _fields(table: dict[str, Any], cls: type, where: str, nested: tuple[str, ...] = (),
            drop: tuple[str, ...] = (), types: dict[str, str] | None = None) -> dict[str, Any]:
    """The table's keys as keyword arguments of `cls`, each checked against its field's type.

    nested: keys parsed by the caller (subtables); drop: fields that are no key here.
    """
    kinds = {f.name: str(f.type) for f in fields(cls) if f.name not in drop}
    kinds.update(types or {})
    _known(table, set(kinds), where)
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in nested:
            continue
        kind = kinds[key]
        if kind.startswith("list"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}.{key}: must be a list of strings, got {value!r}")
            out[key] = list(value)
            continue
        # bool is an int in Python; `port = true` is still a mistake.
        if not isinstance(value, _TYPES[kind]) or (kind != "bool" and isinstance(value, bool)):
            article = "an" if kind == "int" else "a"
            got = f"{type(value).__name__} {value!r}"
            raise ConfigError(f"{where}.{key}: must be {article} {kind}, got {got}")
        if kind == "float" and not math.isfinite(value):
            raise ConfigError(f"{where}.{key}: must be finite, got {value!r}")
        out[key] = float(value) if kind == "float" else value
    return out


def _positive(obj: object, where: str, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{where}.{name}: must be > 0, got {getattr(obj, name)!r}")
