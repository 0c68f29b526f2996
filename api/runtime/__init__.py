"""The running service: what it holds (store, deployments, batchers), its background jobs, interrupts."""
