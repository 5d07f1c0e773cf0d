"""dit-generate: the command-line client (talks to a server, or runs the model locally)."""
