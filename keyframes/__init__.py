"""keyframes: a video shotlist in, SDXL keyframes out, every run logged to MLflow.

`keyframes.generate(...)` and `keyframes.load_manifest(path)` are the Python API (keyframes.api);
importing the package loads neither torch nor Hydra until one is called."""

__all__ = ["generate", "load_manifest"]


def __getattr__(name: str):
    if name in __all__:
        from keyframes import api

        return getattr(api, name)
    raise AttributeError(f"module 'keyframes' has no attribute {name!r}")
