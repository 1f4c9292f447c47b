"""mamba-zoo: Mamba-family models with one selective-scan core and timm-style pretrained entries."""
from importlib.metadata import PackageNotFoundError, version as _version

from zoo.registry import create_model, list_models, model_info

try:
    __version__ = _version("mamba-zoo")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"


def _register_models() -> None:
    import warnings

    try:
        import zoo.models  # noqa: F401  (importing the modalities registers their entries)
    except ModuleNotFoundError as e:
        # A missing optional third-party dependency must not make `import zoo` fail; a missing zoo module is a bug.
        if e.name is None or e.name.split(".")[0] == "zoo":
            raise
        warnings.warn(f"zoo: some model entries are not registered; optional dependency '{e.name}' is missing", stacklevel=3)


_register_models()

__all__ = ["create_model", "list_models", "model_info", "__version__"]
