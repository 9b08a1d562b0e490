"""vkd.boot."""
