"""The Hotswap worker: serves image jobs from RabbitMQ with hot-swappable models."""
