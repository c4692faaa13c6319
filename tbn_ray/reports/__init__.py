"""Reports: markdown tables, JSON and PNG plots written from aggregated results."""
