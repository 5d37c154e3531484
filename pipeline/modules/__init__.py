"""Thin LightningModules: they call algorithms/ and rollout/, Lightning does the loop."""
