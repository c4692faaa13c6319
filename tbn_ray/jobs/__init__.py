"""The long jobs (certification, evaluation, the pipeline): plans, work units and aggregation,
run in this process or handed to the Ray layer. No Ray import here."""
