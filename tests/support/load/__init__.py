"""A minimal session app and an HTTP load generator for the load test."""
