"""The vLLM engine: client, weight push, server start-up, and the worker extension running inside vLLM."""
