"""tierserve: vLLM tiers behind one OpenAI-compatible Ray Serve ingress."""

__version__ = "0.1.0"
