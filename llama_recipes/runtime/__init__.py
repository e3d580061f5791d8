"""The processes a run spans: rank, world size and the collectives between them."""
