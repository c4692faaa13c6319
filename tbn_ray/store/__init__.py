"""Where results live: one storage layer (a local directory or s3://) and the run layout on it."""
