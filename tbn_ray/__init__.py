"""tbn-ray: certified and corruption-robust classifiers from adversarially trained models
with test-time adaptive batch normalization, on Ray.

Importing the package (or any science module) never imports Ray: the GPU measurement
machines have torch but no Ray.
"""

__version__ = "0.1.0"
