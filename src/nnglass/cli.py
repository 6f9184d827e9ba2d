"""`nnglass serve | keys | models | demo`: the command line. The CLI prints; the library logs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import _config

DEMO_MODEL = "smollm2-135m"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnglass", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the inference service")
    serve.add_argument("--config", type=Path, help="server.toml (see examples/server.toml)")
    serve.add_argument("--model", help="quick form: serve this one model (e.g. smollm2-135m)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--ray", metavar="ADDRESS", default=None,
                       help='replicas as actors on this Ray cluster ("auto" or HOST:PORT)')

    keys = sub.add_parser("keys", help="manage API keys (in NNGLASS_HOME, or the --config server's database)")
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("name", nargs="?")
    keys.add_argument("--config", type=Path,
                      help="server.toml: its database (PostgreSQL, or its home's SQLite)")

    models = sub.add_parser("models", help="list the models a config serves")
    models.add_argument("--config", type=Path)

    sub.add_parser("demo", help="start a local server, run the seed experiment remotely, stop")
    args = parser.parse_args(argv)
    return {"serve": _serve, "keys": _keys, "models": _models, "demo": _demo}[args.command](args)


def _server_config(args: argparse.Namespace):
    from .server.config import load_config, quick_config

    if args.config:
        config = load_config(args.config)
    elif getattr(args, "model", None):
        config = quick_config(args.model)
    else:
        raise SystemExit("nnglass serve: give --config server.toml or --model NAME")
    overrides = {k: getattr(args, k, None) for k in ("host", "port")}
    if getattr(args, "ray", None):
        overrides.update(engine="ray", ray_address=args.ray)
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from .server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = _server_config(args)
    names = ", ".join(m.name for m in config.models)
    print(f"nnglass: serving {names} on http://{config.host}:{config.port} (state in {config.home})",
          flush=True)
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from .server.config import ServerConfig, load_config
    from .server.stores import open_keys

    config = load_config(args.config) if args.config else ServerConfig(home=_config.home())
    if not config.database:
        config.home.mkdir(parents=True, exist_ok=True)
    store = open_keys(config)
    try:
        return _key_action(store, args)
    finally:
        store.close()


def _key_action(store, args: argparse.Namespace) -> int:
    if args.action == "create":
        if not args.name:
            raise SystemExit("nnglass keys create NAME")
        key_id, key = store.create(args.name)
        print(f"created key {key_id} for {args.name!r}; it is shown once, keep it:")
        print(key)
    elif args.action == "list":
        for row in store.list():
            state = "revoked" if row["revoked"] else "active"
            print(f"{row['id']}  {row['name']:<20} {state}  created {time.ctime(row['created'])}")
    else:
        if not args.name:
            raise SystemExit("nnglass keys revoke NAME_OR_ID")
        if not store.revoke(args.name):
            print(f"no key {args.name!r}", file=sys.stderr)
            return 1
        print("revoked")
    return 0


def _models(args: argparse.Namespace) -> int:
    from .server.config import load_config, quick_config

    config = load_config(args.config) if args.config else quick_config(DEMO_MODEL)
    for m in config.models:
        print(f"{m.name}  source={m.source} dtype={m.dtype} replicas={m.replicas}  "
              f"policy={json.dumps(m.policy.summary())}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The seed experiment, sent with remote=True to a server started here and stopped after."""
    with tempfile.TemporaryDirectory(prefix="nnglass-demo-") as home:
        env = {**os.environ, "NNGLASS_HOME": home}
        port = _free_port()
        host = f"http://127.0.0.1:{port}"
        made = subprocess.run([sys.executable, "-m", "nnglass", "keys", "create", "demo"], env=env,
                              check=True, capture_output=True, text=True)
        key = made.stdout.strip().splitlines()[-1]
        print(f"starting a server on {host} (embedded default: SQLite + results in {home}) ...", flush=True)
        server = subprocess.Popen([sys.executable, "-m", "nnglass", "serve", "--model", DEMO_MODEL,
                                   "--host", "127.0.0.1", "--port", str(port)], env=env)
        try:
            _wait_ready(host, key, server)
            example = Path(__file__).resolve().parents[2] / "examples" / "seed_experiment.py"
            client_env = {**env, "NNGLASS_HOST": host, "NNGLASS_API_KEY": key}
            return subprocess.run([sys.executable, str(example), "--remote"], env=client_env).returncode
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
            print("server stopped.", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(host: str, key: str, server: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{host}/health", timeout=2) as r:
                states = json.load(r)["models"]
            if all(s == "ready" for s in states.values()):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready in time")

