"""Load a packed model for serving, and run the server (in the foreground, or in a thread for tests)."""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

from ..errors import UsageError
from .app import ServeConfig, create_app
from .worker import Engine, GenerationWorker

log = logging.getLogger("bittern.serve")

API_KEY_ENV = "BITTERN_API_KEY"


def default_model_path() -> Path:
    """The model to serve when none is named: ``bittern.train.default_model_path()`` if it exists."""
    try:
        from ..train import default_model_path as trained_default  # type: ignore[attr-defined]
    except ImportError:
        trained_default = None
    path = trained_default() if trained_default is not None else None
    if path is not None and Path(path).exists():
        return Path(path)
    raise UsageError("no model given and no default trained model is installed: pass --model PATH "
                     "(a packed bittern model directory)")


def make_engine(model_dir: str | os.PathLike, max_batch: int = 8, max_len: int | None = None, engine: str = "auto",
                prefill_chunk: int | None = None, prompt_cache_bytes: int = 0) -> Engine:
    """The continuous-batching engine for a packed model directory.

    ``engine="reference"`` is :class:`bittern.batching.BatchGenerator` over :func:`~bittern.modelfile.load_packed`;
    ``"fast"`` is ``bittern.engine.Engine.load(dir).batch_generator(...)`` (same interface); ``"auto"``
    takes the fast one when it imports. ``prefill_chunk``: prompt tokens a fast-engine step carries with
    the running requests (default: the engine's, ``bittern.engine.generate.DEFAULT_PREFILL_CHUNK``);
    ``prompt_cache_bytes``: host memory keeping the keys and values of prompts whose KV-cache slots were
    taken by others (fast engine; :class:`bittern.prefix_store.PrefixStore`).
    """
    if engine not in ("auto", "fast", "reference"):
        raise ValueError(f"engine must be 'auto', 'fast' or 'reference', got {engine!r}")
    if engine != "reference":
        try:
            from ..engine import Engine as FastEngine
        except ImportError as e:
            if engine == "fast":
                raise UsageError(f"the fast engine is not available ({e})") from None
        else:
            fast = FastEngine.load(model_dir)
            options: dict[str, Any] = {"prefix_store_bytes": prompt_cache_bytes}
            if prefill_chunk is not None:
                options["prefill_chunk"] = prefill_chunk
            return fast.batch_generator(max_batch=max_batch, max_len=max_len, **options)
    from ..batching import BatchGenerator
    from ..modelfile import load_packed

    return BatchGenerator(load_packed(model_dir), max_batch=max_batch, max_len=max_len)


def build_app(model_dir: str | os.PathLike, config: ServeConfig | None = None, max_batch: int = 8,
              max_len: int | None = None, engine: str = "auto", engine_wrapper: Callable[[Engine], Engine] | None = None,
              prefill_chunk: int | None = None, prompt_cache_bytes: int = 0) -> Any:
    """The server application for a packed model directory (its tokenizer must be inside it)."""
    from ..modelfile import read_config
    from ..tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    info = read_config(model_dir)
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError("prefill_chunk must be at least 1")
    if prompt_cache_bytes < 0:
        raise ValueError("prompt_cache_bytes must be >= 0")
    tok_name = info.get("tokenizer") or "tokenizer.json"
    if not (model_dir / tok_name).is_file():
        raise UsageError(f"{model_dir}: no tokenizer ({tok_name}) in the model directory; the server needs one")
    tokenizer = load_tokenizer(model_dir / tok_name)
    generator = make_engine(model_dir, max_batch=max_batch, max_len=max_len, engine=engine, prefill_chunk=prefill_chunk,
                            prompt_cache_bytes=prompt_cache_bytes)
    if engine_wrapper is not None:
        generator = engine_wrapper(generator)
    config = config or ServeConfig(model_name=model_dir.name)
    worker = GenerationWorker(generator, tokenizer, max_queue=config.max_queue)
    return create_app(worker, tokenizer, config)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(app: Any, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn

    if not _is_loopback(host) and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


class ServerThread:
    """A uvicorn server on a background thread (tests, benchmarks); use as a context manager.

    ``port=0`` picks a free port; :attr:`url` is the base URL once started.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=2, lifespan="on"))
        self.host = host
        self.port = port
        self._thread = threading.Thread(target=self.server.run, name="bittern-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        """Start and wait until the server accepts connections."""
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.02)):
            if self.server.started:
                break
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited during start-up")
            deadline.wait(0.02)
        else:
            raise RuntimeError(f"the server did not start within {timeout:g} s")
        sockets = [s for server in self.server.servers for s in server.sockets]
        self.port = sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Ask the server to exit and wait for it."""
        self.server.should_exit = True
        self._thread.join(timeout=15)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
