"""The web console: the fleet, the updates, a model tried on an image, and what runs changed, from a
browser (`hotswap console`). Built on the control plane; nothing imports it."""
