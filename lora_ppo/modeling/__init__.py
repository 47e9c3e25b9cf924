"""The one base model and its roles."""
