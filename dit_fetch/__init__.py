"""dit-fetch: download DiT and VAE weights once, verified, resumable, converted to safetensors.

It runs before the server starts (by hand, or as the compose file's one-shot service), never in the
request path; the server and `model/` only ever read local files.
"""
