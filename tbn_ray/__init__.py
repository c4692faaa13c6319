"""tbn-ray: certified and corruption-robust classifiers from adversarially trained models
with test-time adaptive batch normalization, on Ray.

Importing the package (or any science module) never imports Ray: the GPU measurement
machines have torch but no Ray.
"""

__version__ = "0.1.0"

#: The Python API (``tbn_ray.api``), imported on first use so that the CLI starts fast.
_API = (
    "load_model",
    "calibrate",
    "certify",
    "evaluate_attack",
    "evaluate_corruptions",
    "Calibration",
    "Certification",
    "Evaluation",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    if name in _API:
        from tbn_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'tbn_ray' has no attribute {name!r}")
