"""fedct: federated learning on CT imaging (command line and the demo job)."""
