"""clients: the Flower layer (thin over papm_core)."""
