"""lorafmt."""
