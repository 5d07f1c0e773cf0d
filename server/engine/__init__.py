"""The engine: the scheduler (who joins and leaves the batch) and the model runner (the device),
talking through the step contract. It never imports the HTTP side."""
