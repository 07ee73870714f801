"""SpecForge integration: its offline layout, its runtime contracts and its capture output on torch_dataflow."""
