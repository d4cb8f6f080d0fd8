"""OpenAI-compatible HTTP server with continuous batching (``bittern serve``).

- :mod:`~bittern.serve.worker`: the thread that drives a continuous-batching engine for all requests.
- :mod:`~bittern.serve.app`: the FastAPI routes (``/v1/models``, ``/v1/completions``,
  ``/v1/chat/completions``, ``/health``, ``/metrics``, the chat page at ``/``).
- :mod:`~bittern.serve.schemas`: the OpenAI request and error formats.
- :mod:`~bittern.serve.middleware`: API key, body-size limit, request counting.
- :mod:`~bittern.serve.chat_template`: chat messages to prompt text.
- :mod:`~bittern.serve.detokenize`: streaming token ids to text, with stop strings.
- :mod:`~bittern.serve.server`: loading a model directory, running uvicorn.
"""

from .app import ServeConfig, create_app
from .server import ServerThread, build_app, default_model_path, make_engine, run_server
from .worker import Engine, GenerationWorker, QueueFull

__all__ = ["Engine", "GenerationWorker", "QueueFull", "ServeConfig", "ServerThread", "build_app", "create_app",
           "default_model_path", "make_engine", "run_server"]
