"""The official OpenAI client, set up for the tests' replicas."""

import openai


def client(server, api_key: str = "unused", **kwargs) -> openai.OpenAI:
    """The official client on `server`'s HTTP API, without retries (a refusal must surface)."""
    return openai.OpenAI(base_url=server.http_url, api_key=api_key, max_retries=0, timeout=60, **kwargs)
