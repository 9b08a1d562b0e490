"""vkd.feature3dgs."""
