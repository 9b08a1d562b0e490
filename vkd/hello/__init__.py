"""vkd.hello."""
