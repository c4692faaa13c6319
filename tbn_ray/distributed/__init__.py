"""The Ray layer: connects to a cluster and orchestrates the jobs on actors, Ray Train and Ray Tune.
The only subpackage that imports Ray."""
