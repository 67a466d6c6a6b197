"""CPU fast paths (oneDNN-packed weights, the lean decode step), chosen once at start-up by
the components that use them; GPU and other backends never go through them."""
