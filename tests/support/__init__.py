"""Test and benchmark support: reference servers, fixtures and baselines the product does not use."""
