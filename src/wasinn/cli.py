"""`wasinn run [options] MODULE.wasm [ARGS...]`: run a WASI command with wasi-nn.
`wasinn preinit MODULE.wasm -o OUT.wasm`: snapshot a guest after its `wizer.initialize`.
`wasinn serve [options]`: serve the named models over OpenAI's HTTP API.
`wasinn cache eval DATASET`: the semantic cache's precision, recall and latency on labelled pairs.

Every option has the same name in the TOML config file (`--config`), e.g.
    nn-preload = ["mobilenet:onnx:cpu:models/mobilenet.onnx"]
    nn-graph = ["onnx::models/squeezenet"]
    dir = ["data:/data"]
    env = {LANG = "C"}
    max-memory = "512M"
    timeout = 30
Lists from the file and from the command line add up; single values on the command line win.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import wasmtime

from . import __version__
from .errors import ConfigError, WasiNnError
from .host import GuestTimeout, Host, Preopen
from .registry import ModelSpec
from .tensor import GraphEncoding

EXIT_TIMEOUT = 124
EXIT_TRAP = 134  # what wasmtime's own CLI reports for a trap: 128 + SIGABRT
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str | int) -> int:
    """Bytes from `1048576`, `512K`, `64M`, `2G` (binary units; a trailing B or iB is allowed)."""
    if isinstance(text, int):
        return text
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in _SUFFIXES else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise ConfigError(f"not a size: {text!r} (try 512M or 2G)") from None
    if number < 0:
        raise ConfigError(f"size must be positive: {text!r}")
    return int(number * _SUFFIXES[unit])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wasinn", description="Run WebAssembly with wasi-nn.")
    parser.add_argument("--version", action="version", version=f"wasinn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a WASI command module",
                              description="Run MODULE.wasm (a WASI command) with wasi-nn.")
    run.add_argument("--config", type=Path, help="TOML file whose keys are these options' names")
    run.add_argument("--nn-preload", action="append", default=[], metavar="NAME:ENC:TARGET:PATH",
                     help="offer a named model (WasmEdge syntax; more paths with ':')")
    run.add_argument("--nn-graph", action="append", default=[], metavar="ENCODING::DIR",
                     help="offer the model in DIR, named after DIR (wasmtime syntax)")
    run.add_argument("--dir", action="append", default=[], metavar="HOST[:GUEST]",
                     help="preopen a host directory for the guest")
    run.add_argument("--env", action="append", default=[], metavar="K=V",
                     help="set an environment variable in the guest")
    run.add_argument("--max-memory", metavar="SIZE", help="cap on guest linear memory, e.g. 256M")
    run.add_argument("--timeout", type=float, metavar="SECONDS", help="stop the guest after this")
    run.add_argument("--max-tensor-bytes", metavar="SIZE", help="largest tensor a guest may set")
    run.add_argument("--threads", type=int, help="threads per inference (backend intra-op)")
    run.add_argument("--cache-dir", metavar="DIR", help="compiled-module cache directory")
    run.add_argument("--no-cache", action="store_true", help="compile without the module cache")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="log every errno a guest receives, with its reason")
    run.add_argument("module", type=Path, metavar="MODULE.wasm")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS")
    _add_serve(commands)
    _add_cache(commands)
    _add_preinit(commands)
    return parser


def _add_preinit(commands: argparse._SubParsersAction) -> None:
    pre = commands.add_parser(
        "preinit", help="pre-initialize a guest that exports wizer.initialize",
        description="Run MODULE.wasm's init function once and write OUT.wasm, whose memory and "
                    "globals start from that snapshot. During init, wasi-nn graphs may be "
                    "loaded by name only; OUT.wasm then needs the same model names wherever "
                    "it runs.")
    pre.add_argument("module", type=Path, metavar="MODULE.wasm")
    pre.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.wasm")
    pre.add_argument("--init-func", default="wizer.initialize", metavar="NAME",
                     help="the export to run (default wizer.initialize)")
    pre.add_argument("--engine", choices=("auto", "wizer", "wasinn"), default="auto",
                     help="wizer: the real Wizer (WASI-only inits); wasinn: ours (wasi-nn "
                          "load_by_name allowed); auto: Wizer unless the module imports "
                          "wasi-nn or --env is given (default)")
    pre.add_argument("--config", type=Path, help="TOML file, as `wasinn run`'s")
    pre.add_argument("--nn-preload", action="append", default=[],
                     metavar="NAME:ENC:TARGET:PATH", help="offer a named model during init")
    pre.add_argument("--nn-graph", action="append", default=[], metavar="ENCODING::DIR",
                     help="offer the model in DIR during init, named after DIR")
    pre.add_argument("--dir", action="append", default=[], metavar="HOST[:GUEST]",
                     help="preopen a host directory during init")
    pre.add_argument("--env", action="append", default=[], metavar="K=V",
                     help="set an environment variable during init")
    pre.add_argument("--threads", type=int, help="threads per inference (backend intra-op)")
    pre.add_argument("-v", "--verbose", action="store_true", help="log every wasi-nn errno")
    pre.set_defaults(max_memory=None, timeout=None, max_tensor_bytes=None, cache_dir=None,
                     no_cache=True)


def preinit_main(args: argparse.Namespace) -> int:
    from .preinit import PreinitError, preinitialize

    try:
        args = merge_config(args)
        env = _env(args.env)
        dirs = [Preopen.parse(d) for d in args.dir]
        wasm = args.module.read_bytes()
        host = host_from_args(args)
    except (ConfigError, OSError) as e:
        print(f"wasinn: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        done = preinitialize(wasm, host, engine=args.engine, init_func=args.init_func,
                             env=env, dirs=dirs)
        args.output.write_bytes(done.wasm)
    except (PreinitError, WasiNnError, OSError) as e:
        print(f"wasinn: {e}", file=sys.stderr)
        return 1
    finally:
        host.close()
    graphs = "" if done.record is None else \
        f", graphs bound: {', '.join(f'{g.handle}={g.name}' for g in done.record.graphs) or 'none'}"
    print(f"wasinn: pre-initialized {args.module} with {done.engine} -> {args.output} "
          f"({len(done.wasm):,} bytes{graphs})", file=sys.stderr)
    return 0


SERVE_HOST = "127.0.0.1"
SERVE_PORT = 8000
SERVE_PARALLEL = 2
# the semantic cache's defaults (wasinn.cache, not imported here: it needs the server extra)
CACHE_THRESHOLD = 0.95  # cosine alone
CACHE_VERIFIED_THRESHOLD = 0.85  # with the verifier: the cosine a candidate needs to be read
VERIFY_THRESHOLD = 0.5
CACHE_TTL = 7 * 24 * 3600.0
CACHE_MAX_ENTRIES = 100_000
UPSTREAM_TIMEOUT = 60.0
#: the server embeds, then searches: onnxruntime's workers must not spin past a run
SERVER_BACKENDS = {GraphEncoding.ONNX: {"spin_after_run": False}}
UPSTREAM_KEY_ENV = "WASINN_UPSTREAM_API_KEY"
ROUTE_TIMEOUT = 30.0
ROUTE_WORKERS = 4
#: instances each route makes ahead for its next requests (see WagiRoute)
ROUTE_AHEAD = 1

_DURATIONS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | int | float) -> float:
    """Seconds from `3600`, `90s`, `30m`, `12h`, `7d`."""
    value = str(text).strip().lower()
    unit = value[-1:] if value[-1:] in _DURATIONS else ""
    try:
        seconds = float(value[:len(value) - len(unit)]) * _DURATIONS.get(unit, 1)
    except ValueError:
        raise ConfigError(f"not a duration: {text!r} (try 3600, 30m, 12h or 7d)") from None
    if not seconds > 0:
        raise ConfigError(f"duration must be positive: {text!r}")
    return seconds


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wasinn" / "cache.sqlite"


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="serve the models over an OpenAI-compatible HTTP API",
        description="Serve the named models over OpenAI's HTTP API: /v1/chat/completions, "
                    "/v1/completions, /v1/embeddings, /v1/models, and /health, /metrics.")
    serve.add_argument("--config", type=Path, help="TOML file whose keys are these options' names")
    serve.add_argument("--host", metavar="ADDRESS",
                       help=f"address to listen on (default {SERVE_HOST})")
    serve.add_argument("--port", type=int, help=f"port to listen on (default {SERVE_PORT})")
    serve.add_argument("--nn-preload", action="append", default=[],
                       metavar="NAME:ENC:TARGET:PATH",
                       help="offer a named model (as `wasinn run`; GGUF chat models: GGML, "
                            "sentence-embedding models: ONNX); without any, the defaults: "
                            "smollm2 (chat) and minilm (embeddings)")
    serve.add_argument("--chat-model", metavar="NAME",
                       help="answers chat and completion requests that name a model this server "
                            "does not offer (without it they are 404)")
    serve.add_argument("--embedding-model", metavar="NAME",
                       help="the same, for embedding requests")
    serve.add_argument("--embedding-tokenizer", metavar="PATH",
                       help="the ONNX embedding models' tokenizer: a tokenizer.json, or a BERT "
                            "vocab.txt (lower-cased WordPiece); default: BERT uncased's, "
                            "all-MiniLM-L6-v2's")
    serve.add_argument("--threads", type=int, help="threads per inference (backend intra-op)")
    serve.add_argument("--parallel", type=int,
                       help=f"requests generating at once, each with its own context; more wait "
                            f"their turn (default {SERVE_PARALLEL})")
    serve.add_argument("--cache", metavar="PATH_OR_DSN",
                       help="the semantic cache's SQLite file (default "
                            "$XDG_CACHE_HOME/wasinn/cache.sqlite, else ~/.cache/wasinn/...), or "
                            "a postgresql://... DSN that several servers share")
    serve.add_argument("--no-cache", action="store_true", default=None,
                       help="serve without the semantic cache")
    serve.add_argument("--threshold", type=float, metavar="COSINE",
                       help=f"cosine similarity a cached question needs: to be read by the "
                            f"verifier (default {CACHE_VERIFIED_THRESHOLD}), or with --verifier "
                            f"none to answer (default {CACHE_THRESHOLD})")
    serve.add_argument("--verifier", metavar="PATH|none",
                       help="the cache's second stage, a cross-encoder ONNX file that checks "
                            "each candidate (default: the one wasinn ships, trained on QQP); "
                            "none: cosine alone")
    serve.add_argument("--verify-threshold", type=float, metavar="P",
                       help=f"probability the verifier must give a candidate to serve it "
                            f"(default {VERIFY_THRESHOLD}, its calibrated decision point)")
    serve.add_argument("--cache-ttl", metavar="DURATION",
                       help="how long an answer may be served: seconds, or 30m, 12h, 7d "
                            "(default 7d)")
    serve.add_argument("--cache-max-entries", type=int, metavar="N",
                       help=f"entries kept; the least recently used go first (default "
                            f"{CACHE_MAX_ENTRIES:,})")
    serve.add_argument("--upstream", metavar="URL",
                       help="send chat and completion requests for any model but the local "
                            "ones to this OpenAI-compatible API (its base URL, e.g. "
                            "https://api.openai.com/v1), the semantic cache in front")
    serve.add_argument("--upstream-timeout", type=float, metavar="SECONDS",
                       help=f"wait at most this long for the upstream to connect, and for "
                            f"each piece of an answer (default {UPSTREAM_TIMEOUT:g})")
    serve.add_argument("--upstream-key", metavar="KEY",
                       help=f"the upstream's API key for clients that send no Authorization "
                            f"(theirs goes through as it is); better: ${UPSTREAM_KEY_ENV}")
    serve.add_argument("--route", action="append", default=[], metavar="/PATH=MODULE.wasm",
                       help="serve a WASI command at /PATH (and the paths under it), WAGI-style: "
                            "each request runs a fresh instance, the body on stdin, the request "
                            "in CGI variables, CGI headers and the body on stdout")
    serve.add_argument("--route-timeout", type=float, metavar="SECONDS",
                       help=f"a route's guest is stopped after this, a 504 (default "
                            f"{ROUTE_TIMEOUT:g})")
    serve.add_argument("--route-max-memory", metavar="SIZE",
                       help="cap on each route request's guest linear memory, e.g. 256M")
    serve.add_argument("--route-workers", type=int, metavar="N",
                       help=f"route requests running at once (default {ROUTE_WORKERS})")
    serve.add_argument("--route-ahead", type=int, metavar="N",
                       help=f"instances each route makes ahead, after its responses, for its "
                            f"next requests; 0: each request makes its own (default "
                            f"{ROUTE_AHEAD})")
    serve.add_argument("--route-queue", type=int, metavar="N",
                       help="route requests waiting for a worker; more are a 503 (default: "
                            "as many as the workers)")
    serve.add_argument("--route-env", action="append", default=[], metavar="K=V",
                       help="set an environment variable in every route's guest")
    serve.add_argument("--route-dir", action="append", default=[], metavar="HOST[:GUEST]",
                       help="preopen a host directory for every route's guest")
    serve.add_argument("-v", "--verbose", action="store_true", help="log every request")


_LIST_KEYS = ("nn-preload", "nn-graph", "dir")
_VALUE_KEYS = ("max-memory", "timeout", "max-tensor-bytes", "threads", "cache-dir")


def merge_config(args: argparse.Namespace) -> argparse.Namespace:
    """Fold a TOML config file into the parsed flags (flags win, lists add up)."""
    if args.config is None:
        return args
    try:
        data: dict[str, Any] = tomllib.loads(args.config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config {args.config}: {e}") from None
    known = set(_LIST_KEYS) | set(_VALUE_KEYS) | {"env", "no-cache"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config {args.config}: unknown key(s) {', '.join(unknown)}")
    base = args.config.parent
    for key in _LIST_KEYS:
        values = data.get(key, [])
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"config {args.config}: {key} must be a list of strings")
        attr = key.replace("-", "_")
        setattr(args, attr, [_relative(key, v, base) for v in values] + getattr(args, attr))
    env = data.get("env", {})
    if isinstance(env, dict):
        env = [f"{k}={v}" for k, v in env.items()]
    args.env = list(env) + args.env
    for key in _VALUE_KEYS:
        attr = key.replace("-", "_")
        if getattr(args, attr) is None and key in data:
            setattr(args, attr, data[key])
    args.no_cache = args.no_cache or bool(data.get("no-cache", False))
    return args


def _relative(key: str, value: str, base: Path) -> str:
    """Paths in a config file are relative to the file, as users of config files expect."""
    if key == "nn-preload":
        name, enc, target, *paths = value.split(":")
        paths = [str(base / p) for p in paths]
        return ":".join([name, enc, target, *paths])
    if key == "route":  # /PATH=MODULE.wasm
        path, sep, module = value.partition("=")
        return f"{path}={base / Path(module).expanduser()}" if sep else value
    if key == "route-env":
        return value
    if key == "nn-graph":
        encoding, sep, directory = value.partition("::")
        return f"{encoding}{sep}{base / directory}" if sep else value
    host, sep, guest = value.partition(":")
    return f"{base / host}{sep}{guest}"


_SERVE_VALUES: dict[str, type | tuple[type, ...]] = {
    "host": str, "port": int, "chat-model": str, "embedding-model": str,
    "embedding-tokenizer": str, "threads": int,
    "parallel": int, "cache": str, "no-cache": bool, "threshold": (float, int),
    "verifier": str, "verify-threshold": (float, int),
    "cache-ttl": (str, int, float), "cache-max-entries": int, "upstream": str,
    "upstream-timeout": (float, int), "upstream-key": str,
    "route-timeout": (float, int), "route-max-memory": (str, int), "route-workers": int,
    "route-queue": int, "route-ahead": int}
_SERVE_LISTS = ("nn-preload", "route", "route-env", "route-dir")


def merge_serve_config(args: argparse.Namespace) -> argparse.Namespace:
    """`wasinn serve`'s config file: the same rules as `wasinn run`'s."""
    if args.config is not None:
        try:
            data: dict[str, Any] = tomllib.loads(args.config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"config {args.config}: {e}") from None
        unknown = sorted(set(data) - set(_SERVE_VALUES) - set(_SERVE_LISTS) - {"verbose"})
        if unknown:
            raise ConfigError(f"config {args.config}: unknown key(s) {', '.join(unknown)}")
        base = args.config.parent
        for key in _SERVE_LISTS:
            values = data.get(key, [])
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ConfigError(f"config {args.config}: {key} must be a list of strings")
            attr = key.replace("-", "_")
            setattr(args, attr, [_relative(key, v, base) for v in values] + getattr(args, attr))
        for key, kind in _SERVE_VALUES.items():
            attr = key.replace("-", "_")
            if getattr(args, attr) is None and key in data:
                kinds = kind if isinstance(kind, tuple) else (kind,)
                if not isinstance(data[key], kinds) or \
                        (isinstance(data[key], bool) and bool not in kinds):
                    names = " or ".join(k.__name__ for k in kinds)
                    raise ConfigError(f"config {args.config}: {key} must be a {names}")
                value = data[key]
                if key == "embedding-tokenizer" or (key == "cache" and "://" not in value) or \
                        (key == "verifier" and value.lower() != "none"):
                    value = str(base / Path(value).expanduser())  # a path, relative to the file
                setattr(args, attr, value)
        args.verbose = args.verbose or bool(data.get("verbose", False))
    args.host = args.host or SERVE_HOST
    args.port = SERVE_PORT if args.port is None else args.port
    args.parallel = SERVE_PARALLEL if args.parallel is None else args.parallel
    if args.parallel < 1:
        raise ConfigError("--parallel must be at least 1")
    if not args.nn_preload:  # the defaults; any --nn-preload replaces them all
        from .server import _defaults

        # with an upstream, chat goes there: only the cache's embedding model is local
        args.nn_preload = _defaults.default_preloads(chat=args.upstream is None)
        if args.upstream is None:
            args.chat_model = args.chat_model or _defaults.CHAT_MODEL
        args.embedding_model = args.embedding_model or _defaults.EMBEDDING_MODEL
    if args.upstream is None:
        for flag in ("upstream-timeout", "upstream-key"):
            if getattr(args, flag.replace("-", "_")) is not None:
                raise ConfigError(f"--{flag} needs --upstream URL")
    elif args.chat_model is not None:
        raise ConfigError("--chat-model and --upstream: with an upstream, a model this server "
                          "does not offer is the upstream's to answer (drop --chat-model)")
    args.upstream_timeout = (UPSTREAM_TIMEOUT if args.upstream_timeout is None
                             else float(args.upstream_timeout))
    if not args.upstream_timeout > 0:
        raise ConfigError(f"--upstream-timeout must be positive, got {args.upstream_timeout}")
    args.no_cache = bool(args.no_cache)
    verified = not _no_verifier(args)
    if args.threshold is None:
        args.threshold = CACHE_VERIFIED_THRESHOLD if verified else CACHE_THRESHOLD
    args.threshold = float(args.threshold)
    args.verify_threshold = (VERIFY_THRESHOLD if args.verify_threshold is None
                             else float(args.verify_threshold))
    if not 0 < args.verify_threshold < 1:
        raise ConfigError(f"--verify-threshold must be in (0, 1), got {args.verify_threshold}")
    if not 0 < args.threshold <= 1:
        raise ConfigError(f"--threshold must be in (0, 1], got {args.threshold}")
    args.cache_ttl = CACHE_TTL if args.cache_ttl is None else parse_duration(args.cache_ttl)
    args.cache_max_entries = (CACHE_MAX_ENTRIES if args.cache_max_entries is None
                              else args.cache_max_entries)
    if args.cache_max_entries < 1:
        raise ConfigError("--cache-max-entries must be at least 1")
    args.route_timeout = (ROUTE_TIMEOUT if args.route_timeout is None
                          else float(args.route_timeout))
    if not args.route_timeout > 0:
        raise ConfigError(f"--route-timeout must be positive, got {args.route_timeout}")
    args.route_workers = ROUTE_WORKERS if args.route_workers is None else args.route_workers
    if args.route_workers < 1:
        raise ConfigError("--route-workers must be at least 1")
    args.route_ahead = ROUTE_AHEAD if args.route_ahead is None else args.route_ahead
    if not 0 <= args.route_ahead <= 8:
        raise ConfigError("--route-ahead must be 0 to 8")
    if args.route_queue is not None and args.route_queue < 0:
        raise ConfigError("--route-queue cannot be negative")
    return args


def route_slots(workers: int, routes: int = 1, ahead: int = ROUTE_AHEAD) -> int:
    """Pooled instance slots for `routes` run by `workers`: each running request holds one,
    and so may each Store waiting to be dropped after its response (at most `workers`), and
    each instance a route made ahead."""
    return 2 * workers + 2 + routes * ahead


def edge_routes(args: argparse.Namespace, host: Host) -> tuple[list[Any], Any]:
    """The --route guests (compiled and linked now: a bad module fails at start-up) and the
    pool of workers they share (None without routes)."""
    if not args.route:
        return [], None
    from .server import WagiPool, WagiRoute
    from .server._wagi import parse_route

    max_memory = None if args.route_max_memory is None else parse_size(args.route_max_memory)
    env = _env(args.route_env)
    dirs = [Preopen.parse(d) for d in args.route_dir]
    pool = WagiPool(args.route_workers, args.route_queue)
    try:
        routes = []
        for text in args.route:
            path, module = parse_route(text)
            if not module.is_file():
                raise ConfigError(f"--route {text}: no such module {module}")
            routes.append(WagiRoute(host, module, route=path, timeout=args.route_timeout,
                                    max_memory=max_memory, env=env, dirs=dirs, pool=pool,
                                    ahead=args.route_ahead))
    except BaseException:
        pool.close()
        raise
    return routes, pool


def cache_config(args: argparse.Namespace) -> Any:
    """The semantic cache's settings from merged flags; None without one. The default file
    that cannot be written means no cache (a warning); a path given that cannot is an error."""
    if args.no_cache:
        return None
    from .cache import CacheConfig, is_dsn

    if args.cache is not None and is_dsn(args.cache):  # opened, and checked, with the app
        try:
            import psycopg  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"--cache {args.cache.split('://')[0]}://...: a PostgreSQL "
                              f"cache needs pip install 'wasinn[postgres]' ({e})") from None
        return CacheConfig(path=args.cache, threshold=args.threshold, ttl=args.cache_ttl,
                           max_entries=args.cache_max_entries, **_verifier(args))
    if args.cache is not None and "://" in args.cache:
        raise ConfigError(f"--cache {args.cache.split('://')[0]}://...: give a SQLite file "
                          f"path or a postgresql:// DSN")
    path = Path(args.cache).expanduser() if args.cache is not None else default_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK) or (path.exists() and
                                                   not os.access(path, os.W_OK)):
            raise PermissionError(f"{path}: not writable")
    except OSError as e:
        if args.cache is not None:
            raise ConfigError(f"--cache {args.cache}: {e}") from None
        print(f"wasinn: warning: serving without the semantic cache ({e}; choose a file with "
              f"--cache PATH)", file=sys.stderr)
        return None
    return CacheConfig(path=path, threshold=args.threshold, ttl=args.cache_ttl,
                       max_entries=args.cache_max_entries, **_verifier(args))


def _no_verifier(args: argparse.Namespace) -> bool:
    return args.verifier is not None and args.verifier.lower() == "none"


def _verifier(args: argparse.Namespace) -> dict[str, Any]:
    from .cache import DEFAULT_VERIFIER

    if _no_verifier(args):
        return {"verifier": None}
    path = DEFAULT_VERIFIER if args.verifier is None else Path(args.verifier).expanduser()
    if not path.is_file():
        raise ConfigError(f"--verifier {path}: no such file (or --verifier none)")
    return {"verifier": path, "verify_threshold": args.verify_threshold}


def upstream_config(args: argparse.Namespace) -> Any:
    """The upstream's settings from merged flags (the key: flag, config, environment); None
    without --upstream."""
    if args.upstream is None:
        return None
    from .server import UpstreamConfig

    key = args.upstream_key or os.environ.get(UPSTREAM_KEY_ENV) or None
    try:
        return UpstreamConfig(url=args.upstream, timeout=args.upstream_timeout, api_key=key)
    except ValueError as e:
        raise ConfigError(f"--upstream: {e}") from None


def serve_main(args: argparse.Namespace) -> int:
    try:
        from .server import serve
    except ImportError as e:
        print(f"wasinn: `wasinn serve` needs pip install 'wasinn[server]' ({e})", file=sys.stderr)
        return EXIT_USAGE
    try:
        args = merge_serve_config(args)
        cache = cache_config(args)
        upstream = upstream_config(args)
        host = Host(threads=args.threads, module_cache=False, progress=ProgressPrinter(),
                    backend_options=SERVER_BACKENDS,
                    instance_pool=route_slots(args.route_workers, len(args.route),
                                              args.route_ahead)
                    if args.route else None)
    except ConfigError as e:
        print(f"wasinn: {e}", file=sys.stderr)
        return EXIT_USAGE
    pool, routes = None, []
    try:
        for text in args.nn_preload:
            host.add_model(text)
        host.registry.preload_all()  # a bad model fails now, not on the first request
        routes, pool = edge_routes(args, host)
        serve(host, bind=args.host, port=args.port, chat_model=args.chat_model,
              embedding_model=args.embedding_model, parallel=args.parallel, cache=cache,
              embedding_tokenizer=(None if args.embedding_tokenizer is None
                                   else Path(args.embedding_tokenizer)),
              upstream=upstream, access_log=args.verbose, routes=routes)
    except (WasiNnError, ValueError, OSError, wasmtime.WasmtimeError) as e:
        print(f"wasinn: {e}", file=sys.stderr)  # ConfigError is a ValueError
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C while the models load (uvicorn handles its own)
        return EXIT_INTERRUPTED
    finally:
        if pool is not None:
            pool.close()
            for route in routes:
                route.close()
        host.close()
    return 0


def host_from_args(args: argparse.Namespace) -> Host:
    cache: bool | str = False if args.no_cache else (args.cache_dir or True)
    host = Host(threads=args.threads,
                max_memory=parse_size(args.max_memory) if args.max_memory is not None else None,
                timeout=args.timeout,
                max_tensor_bytes=(parse_size(args.max_tensor_bytes)
                                  if args.max_tensor_bytes is not None else None),
                module_cache=cache, progress=ProgressPrinter())
    for text in args.nn_preload:
        host.add_model(text)
    for text in args.nn_graph:
        host.add_model(ModelSpec.from_graph_dir(text))
    return host


def _env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {pair!r}: expected K=V")
        env[key] = value
    return env


class ProgressPrinter:
    """Prints a large model's load on stderr, a line per tenth."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def __call__(self, name: str, done: int, total: int, phase: str) -> None:
        if phase == "read":
            percent = done * 100 // max(total, 1)
            if percent // 10 == self._last.get(name, -10) // 10:
                return
            self._last[name] = percent
            print(f"wasinn: loading model {name}: {percent}% of {total / 1e6:.1f} MB",
                  file=sys.stderr, flush=True)
        elif phase == "build":
            print(f"wasinn: loading model {name}: building", file=sys.stderr, flush=True)
        else:
            print(f"wasinn: model {name} ready", file=sys.stderr, flush=True)


def _add_cache(commands: argparse._SubParsersAction) -> None:
    cache = commands.add_parser("cache", help="the semantic cache's tools")
    tools = cache.add_subparsers(dest="tool", required=True)
    ev = tools.add_parser(
        "eval", help="precision, recall and lookup latency on a labelled pair set",
        description="Store every distinct `a` of DATASET (JSON lines {a, b, label}, gzip'd or "
                    "not) in a real cache store, look up every `b` as the server would, and "
                    "print precision and recall over a sweep of thresholds (a hit is right "
                    "when it serves the query's duplicate group), with lookup latency.")
    ev.add_argument("dataset", type=Path, metavar="DATASET")
    ev.add_argument("--part", metavar="K/N",
                    help="only part K of N (split by connected component, as "
                         "scripts/train_verifier.py splits; 0/4 is the part its verifier "
                         "never trained on)")
    ev.add_argument("--limit", type=int, metavar="N", help="only the first N pairs")
    ev.add_argument("--nn-preload", metavar="NAME:ONNX:TARGET:PATH",
                    help="the embedding model (default: the server's, all-MiniLM-L6-v2)")
    ev.add_argument("--embedding-tokenizer", metavar="PATH",
                    help="its tokenizer.json or vocab.txt (default: BERT uncased's)")
    ev.add_argument("--verifier", metavar="PATH|none",
                    help="the second stage (default: the one wasinn ships); none: cosine alone")
    ev.add_argument("--threshold", type=float, metavar="COSINE",
                    help=f"the cosine a candidate needs to be read by the verifier "
                         f"(default {CACHE_VERIFIED_THRESHOLD})")
    ev.add_argument("--threads", type=int, help="threads per inference (backend intra-op)")
    ev.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    ev.add_argument("-v", "--verbose", action="store_true", help="log more")


def cache_eval_main(args: argparse.Namespace) -> int:
    try:
        from .cache import _eval, _pairs
        from .server._defaults import EMBEDDING_MODEL, default_preloads
        from .server._sentence import OnnxEmbedder
    except ImportError as e:
        print(f"wasinn: `wasinn cache eval` needs pip install 'wasinn[server]' ({e})",
              file=sys.stderr)
        return EXIT_USAGE
    host = Host(threads=args.threads, module_cache=False, backend_options=SERVER_BACKENDS)
    embedder = verifier = None
    try:
        if args.part is not None:
            k, sep, n = args.part.partition("/")
            if not (sep and k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
                raise ConfigError(f"--part {args.part!r}: expected K/N with 0 <= K < N")
        pairs = _pairs.load_pairs(args.dataset)
        name = args.dataset.name
        if args.part is not None:
            pairs = [p for p, part in zip(pairs, _pairs.parts_of(pairs, int(n)))
                     if part == int(k)]
            name += f" part {args.part}"
        pairs = pairs[:args.limit]
        spec = args.nn_preload or default_preloads(chat=False)[0]
        model = host.add_model(spec).name
        embedder = OnnxEmbedder(host.registry, tokenizer=args.embedding_tokenizer)
        floor = CACHE_VERIFIED_THRESHOLD if args.threshold is None else args.threshold
        if not _no_verifier(args):
            from .cache import Verifier

            verifier = Verifier(None if args.verifier is None else Path(args.verifier),
                                backend=host.backends.get(GraphEncoding.ONNX))
        report = _eval.evaluate(
            pairs, lambda texts: embedder.embed_now(model, texts).vectors,
            embedding_model=model if args.nn_preload else f"{EMBEDDING_MODEL} (default)",
            verifier=verifier, floor=floor, dataset=name)
    except (ConfigError, ValueError, WasiNnError, OSError) as e:
        print(f"wasinn: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if verifier is not None:
            verifier.close()
        if embedder is not None:
            embedder.close()
        host.close()
    print(_eval.format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_dict(), indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="wasinn: %(message)s",
                        level=logging.INFO if args.verbose else logging.WARNING)
    if args.command == "serve":
        return serve_main(args)
    if args.command == "cache":
        return cache_eval_main(args)
    if args.command == "preinit":
        return preinit_main(args)
    try:
        args = merge_config(args)
        host = host_from_args(args)
        env = _env(args.env)
        dirs = [Preopen.parse(d) for d in args.dir]
        for preopen in dirs:
            if not preopen.host.is_dir():
                raise ConfigError(f"--dir {preopen.host}: not a directory")
        if not args.module.is_file():
            raise ConfigError(f"{args.module}: no such module")
    except ConfigError as e:
        print(f"wasinn: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return host.run(args.module, args.args, env=env, dirs=dirs, program=args.module.name)
    except GuestTimeout as e:
        print(f"wasinn: {e}", file=sys.stderr)
        return EXIT_TIMEOUT
    except wasmtime.Trap as e:
        print(f"wasinn: the guest trapped: {e}", file=sys.stderr)
        return EXIT_TRAP
    except (wasmtime.WasmtimeError, ValueError) as e:  # PreinitError (a model not offered) too
        print(f"wasinn: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        host.close()


if __name__ == "__main__":
    sys.exit(main())
