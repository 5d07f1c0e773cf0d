"""Training of the embedded Fashion-MNIST model and its quality check (run by hand, not by the server)."""
