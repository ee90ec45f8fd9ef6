"""Serving exported models with vLLM: its private environment (vllm_env.py) and the server process
(server.py)."""
