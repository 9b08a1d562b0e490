"""vkd.metrics."""
