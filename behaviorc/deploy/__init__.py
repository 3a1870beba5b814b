"""Deploying into live vLLM servers."""
