"""The DiT inference server: HTTP (api) -> scheduler -> model runner (model/)."""
